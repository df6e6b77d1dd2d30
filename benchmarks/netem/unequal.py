"""Unequal devices: P = 2 ranks on loopback, rank 1 limited to a fraction of a core with
the cgroup v1 cpu controller, equal partitions vs stated speeds (--speeds) vs measured
speeds (--calibrate), for Prism and Voltage, against one fast device alone.

Run through run_unequal.sh (root: it writes the cgroup). Rank r is pinned to CPU r
(taskset), one torch thread each; rank 1's process joins the cgroup before it starts
Python, so everything it runs is limited. The single-device figure is rank 0's own
comparison run (`prism run` without --no-compare: the stock model alone on the fast,
unlimited rank). Writes benchmarks/results/unequal_<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODELS = {
    # name: (family, size, extra args, prism args)
    "vit-b16": ("vit", "base", [], ["-m", "10"]),
    "bert-base": ("bert", "base", ["--seq-len", "256"], ["-m", "1"]),
    "tiny": ("bert", "tiny", ["--seq-len", "32"], ["-m", "2"]),      # smoke test
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(args, model, mode, partition, cgroup):
    fam, size, extra, prism_args = MODELS[model]
    flags = ["--family", fam, "--size", size, "--mode", mode, "--threads", "1", "--json",
             "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--timeout", "300"] + extra
    if mode == "prism":
        flags += prism_args
    if partition == "speeds":
        flags += ["--speeds", f"1,{args.quota:g}"]
    elif partition == "calibrate":
        flags += ["--calibrate"]
    port = free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
        cmd = ["taskset", "-c", str(args.cpus[r]), sys.executable, "-m", "prism_kernels.distributed"] + flags
        if r == 1 and cgroup:
            # join the cgroup first, then become python: no unlimited start-up work
            cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"] + cmd
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise SystemExit(f"{model} {mode} {partition}: rank {r} failed ({p.returncode}):\n{e[-2000:]}")
    return json.loads([line for line in outs[0][0].splitlines() if line.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit-b16,bert-base")
    ap.add_argument("--modes", default="prism,voltage")
    ap.add_argument("--partitions", default="equal,speeds,calibrate")
    ap.add_argument("--quota", type=float, default=0.5, help="rank 1's share of one core")
    ap.add_argument("--cgroup", default="", help="cgroup directory rank 1 joins ('' = none)")
    ap.add_argument("--cpus", default="0,1", help="CPU of rank 0 and rank 1")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--tag", default="unequal")
    args = ap.parse_args()
    args.cpus = [int(c) for c in args.cpus.split(",")]
    rows, t0 = [], time.time()
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for part in args.partitions.split(","):
                d = run_pair(args, model, mode, part, args.cgroup)
                row = {"model": model, "mode": mode, "partition": part, "sizes": d["sizes"],
                       "speeds": d.get("speeds"), "calibration_times_s": d.get("calibration_times_s"),
                       "median_s": d["median_s"], "single_median_s": d.get("single_median_s"),
                       "median_wait_s_per_rank": d.get("median_wait_s_per_rank"),
                       "startup_bytes_per_rank": d.get("startup_bytes_per_rank"),
                       "bytes_match_cost_model": d.get("bytes_match_cost_model")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    conditions = {"quota_of_one_core": args.quota, "cgroup": args.cgroup or None, "cpus": args.cpus,
                  "repeat": args.repeat, "warmup": args.warmup, "host": platform.node(),
                  "cpu_count": os.cpu_count(), "wall_s": round(time.time() - t0, 1)}
    (out / f"unequal_{args.tag}.json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=1))
    md = [f"# Unequal devices: rank 1 at {args.quota:g} of a core (cgroup v1 cpu quota)", "",
          "P = 2 on loopback, one torch thread per rank, rank r pinned to CPU r; single = the stock model "
          "alone on the fast rank 0. Latency: median of the timed runs.", "",
          f"Conditions: `{json.dumps(conditions)}`", "",
          "| model | mode | partition | speeds | sizes | latency ms | single ms | speed-up vs single | "
          "wait ms (rank 0, 1) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        single = r["single_median_s"]
        sp = f"x{single / r['median_s']:.2f}" if single else "-"
        speeds = "-" if r["speeds"] is None else ", ".join(f"{w:.2f}" for w in r["speeds"])
        waits = ", ".join(f"{w * 1e3:.1f}" for w in (r["median_wait_s_per_rank"] or []))
        md.append(f"| {r['model']} | {r['mode']} | {r['partition']} | {speeds} | {r['sizes']} | "
                  f"{r['median_s'] * 1e3:.1f} | {single * 1e3 if single else float('nan'):.1f} | {sp} | {waits} |")
    (out / f"unequal_{args.tag}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / f'unequal_{args.tag}.md'}")


if __name__ == "__main__":
    main()

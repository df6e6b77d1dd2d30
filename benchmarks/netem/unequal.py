"""Unequal devices: P = 2 ranks, in two network namespaces joined by a shaped veth pair
(--ns0 ... --mbit, set up by run_unequal.sh) or on loopback, rank 1 limited to a fraction of a core with
the cgroup v1 cpu controller, equal partitions vs stated speeds (--speeds) vs measured
speeds (--calibrate: one block at start-up; --rebalance: the warm-up inferences; or both,
"calibrate+rebalance"), for Prism and Voltage, against one fast device alone.

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
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODE_OPTIONS, shape  # noqa: E402  (same folder: tc shaping, mode suffixes)

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
    mode, *options = mode.split("-")
    flags = ["--family", fam, "--size", size, "--mode", mode, "--threads", "1", "--json",
             "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--timeout", "120"] + extra
    if mode == "prism":
        flags += prism_args
    for o in options:
        flags += MODE_OPTIONS[o]
    if partition == "speeds":
        flags += ["--speeds", f"1,{args.quota:g}"]
    elif partition == "calibrate":
        flags += ["--calibrate"]
    elif partition == "rebalance":          # equal first, then sized from the warm-up runs
        flags += ["--rebalance"]
    elif partition == "calibrate+rebalance":
        flags += ["--calibrate", "--rebalance"]
    netns = bool(args.ns0)
    port = free_port() if not netns else args.port
    args.port += 1
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR=args.addr0 if netns else "127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   GLOO_SOCKET_IFNAME=(args.dev0, args.dev1)[r] if netns else "lo")
        cmd = ["taskset", "-c", str(args.cpus[r]), sys.executable, "-m", "prism_kernels.distributed"] + flags
        if netns:
            cmd = ["ip", "netns", "exec", (args.ns0, args.ns1)[r]] + cmd
        if r == 1 and cgroup:
            # join the cgroup first, then become python: no unlimited start-up work (outside
            # `ip netns exec`, which mounts its own /sys without the cgroup tree)
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
    ap.add_argument("--ns0", default="", help="network namespace of rank 0 ('' = loopback)")
    ap.add_argument("--ns1", default="")
    ap.add_argument("--dev0", default="")
    ap.add_argument("--dev1", default="")
    ap.add_argument("--addr0", default="")
    ap.add_argument("--mbit", type=int, default=0, help="bandwidth the veth pair is shaped to")
    ap.add_argument("--port", type=int, default=29711)
    args = ap.parse_args()
    if args.ns0:
        shape(args.ns0, args.dev0, args.mbit, 0.0)
        shape(args.ns1, args.dev1, args.mbit, 0.0)
    args.cpus = [int(c) for c in args.cpus.split(",")]
    rows, t0 = [], time.time()
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for part in args.partitions.split(","):
                la0 = os.getloadavg()[0]
                d = run_pair(args, model, mode, part, args.cgroup)
                row = {"model": model, "mode": mode, "partition": part, "sizes": d["sizes"],
                       "median_total_s_per_rank": d.get("median_total_s_per_rank"),
                       "median_post_s_per_rank": d.get("median_post_s_per_rank"),
                       "loadavg_before": round(la0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
                       "speeds": d.get("speeds"), "calibration_times_s": d.get("calibration_times_s"),
                       "median_s": d["median_s"], "single_median_s": d.get("single_median_s"),
                       "median_wait_s_per_rank": d.get("median_wait_s_per_rank"),
                       "startup_bytes_per_rank": d.get("startup_bytes_per_rank"),
                       "bytes_match_cost_model": d.get("bytes_match_cost_model")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    import torch
    conditions = {"quota_of_one_core": args.quota, "cgroup": args.cgroup or None, "cpus": args.cpus,
                  "network": f"veth pair shaped to {args.mbit} Mbit/s (tc tbf)" if args.ns0 else "loopback",
                  "cpu": cpu, "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  "repeat": args.repeat, "warmup": args.warmup, "host": platform.node(),
                  "cpu_count": os.cpu_count(), "wall_s": round(time.time() - t0, 1)}
    (out / f"unequal_{args.tag}.json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=1))
    md = [f"# Unequal devices: rank 1 at {args.quota:g} of a core (cgroup v1 cpu quota)", "",
          f"P = 2 ({conditions['network']}), one torch thread per rank, rank r pinned to CPU r; single = the stock model "
          "alone on the fast rank 0. Latency: median of the timed runs.", "",
          f"Conditions: `{json.dumps(conditions)}`", "",
          "| model | mode | partition | speeds | sizes | latency ms | single ms | speed-up vs single | "
          "wait ms (rank 0, 1) | own forward ms (rank 0, 1) | load before |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        single = r["single_median_s"]
        sp = f"x{single / r['median_s']:.2f}" if single else "-"
        speeds = "-" if r["speeds"] is None else ", ".join(f"{w:.2f}" for w in r["speeds"])
        waits = ", ".join(f"{w * 1e3:.1f}" for w in (r["median_wait_s_per_rank"] or []))
        totals = ", ".join(f"{w * 1e3:.1f}" for w in (r["median_total_s_per_rank"] or []))
        md.append(f"| {r['model']} | {r['mode']} | {r['partition']} | {speeds} | {r['sizes']} | "
                  f"{r['median_s'] * 1e3:.1f} | {single * 1e3 if single else float('nan'):.1f} | {sp} | {waits} | "
                  f"{totals} | {r['loadavg_before']} |")
    (out / f"unequal_{args.tag}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / f'unequal_{args.tag}.md'}")


if __name__ == "__main__":
    main()

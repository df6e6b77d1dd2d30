"""Latency of single / voltage / prism (P = 2) over an emulated edge link (paper Fig. 5).

Run through run_latency.sh (root), which creates two network namespaces joined by a
veth pair; this driver reshapes the link with `tc` for every bandwidth, starts rank 0
in the first namespace and rank 1 in the second (`ip netns exec`), one torch thread
per rank pinned to its own core (taskset; rank r on CPU r), batch 1, and reads rank 0's JSON line (median of --repeat timed runs after
--warmup). Traffic only crosses the veth pair inside the namespaces it made.

Writes benchmarks/results/latency_<tag>.csv and .md (with the run conditions).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402

MODELS = {
    # name: (family, size, extra args, prism args)
    "vit-b16": ("vit", "base", [], ["-m", "10"]),          # N = 197; 10 means per partition (paper: CR 9.9)
    "bert-base": ("bert", "base", ["--seq-len", "256"], ["-m", "1"]),   # N = 256; 1 mean (paper: CR 128)
}


# mode suffixes: prism-local-fp16 = prism with --input local --wire-dtype fp16
MODE_OPTIONS = {"nooverlap": ["--no-overlap"], "local": ["--input", "local"], "hidden": ["--input", "hidden"],
                "fp16": ["--wire-dtype", "fp16"], "bf16": ["--wire-dtype", "bf16"], "uint8": ["--pixels", "uint8"],
                "float": ["--pixels", "float"],         # fp32 pixel_values at start-up (uint8 is the default)
                "special": ["--anchors", "special"],      # the static special-token policy (the earlier default)
                "log": ["--count-bias", "log"], "matched": ["--count-bias", "matched"],
                # partitions sized from the warm-up runs' measured compute (equal at first)
                "rebalance": ["--rebalance"],
                # more means per partition than the model's default (the last -m wins)
                "m8": ["-m", "8"], "m16": ["-m", "16"]}


def sh(cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def shape(ns, dev, mbit, delay_ms):
    """Egress shaping of one veth end: optional netem delay, then a token bucket."""
    sh(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
    rate_bytes = mbit * 1e6 / 8
    burst = max(32_000, int(rate_bytes / 250))            # 4 ms of traffic
    tbf = ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "400ms"]
    if delay_ms:
        r = sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                "netem", "delay", f"{delay_ms}ms"], check=False)
        if r.returncode != 0:
            raise SystemExit(f"--delay-ms needs the netem qdisc (kernel module sch_netem), which this "
                             f"kernel lacks: {r.stderr.strip()}")
        sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:"] + tbf)
    else:
        sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"] + tbf)


def run_ranks(args, model, mode, world):
    fam, size, extra, prism_args = MODELS[model]
    mode, *options = mode.split("-")
    unknown = [o for o in options if o not in MODE_OPTIONS]
    if unknown:
        raise SystemExit(f"unknown mode option(s) {unknown}; known: {sorted(MODE_OPTIONS)}")
    cmd_args = ["--family", fam, "--size", size, "--mode", mode, "--threads", "1", "--json", "--interleave-single",
                "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--timeout", "300"] + extra
    if mode == "prism":
        cmd_args += prism_args
    for o in options:
        cmd_args += MODE_OPTIONS[o]
    port = str(args.port)
    procs = []
    for r in range(world):
        ns, dev = (args.ns0, args.dev0) if r == 0 else (args.ns1, args.dev1)
        env = {"PATH": os.environ["PATH"], "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": args.addr0, "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": dev,
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "HOME": os.environ.get("HOME", "/root")}
        cmd = ["ip", "netns", "exec", ns, "env", "-i"] + [f"{k}={v}" for k, v in env.items()] + \
              ["taskset", "-c", str(r % (os.cpu_count() or 1)), "nice", "-n", "5", sys.executable, "-m", "prism_kernels.distributed"] + cmd_args
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, o, e))
    args.port += 1
    rc, o, e = outs[0]
    if rc != 0 or any(x[0] != 0 for x in outs):
        raise RuntimeError(f"{model} {mode} failed: " + " | ".join(x[2][-800:] for x in outs))
    return json.loads([l for l in o.splitlines() if l.startswith("{")][-1])


def per_rank(d, key, r):
    v = d.get(key)
    return round(v[r] * 1e3, 1) if v and len(v) > r else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns0", required=True)
    ap.add_argument("--ns1", required=True)
    ap.add_argument("--dev0", required=True)
    ap.add_argument("--dev1", required=True)
    ap.add_argument("--addr0", required=True)
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--bandwidths", default="50,100,200,500,1000")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--models", default="vit-b16,bert-base")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tag", default="fig5")
    ap.add_argument("--modes", default="voltage,prism",
                    help="P = 2 modes per bandwidth; suffixes add options: -nooverlap (--no-overlap), "
                         "-local / -hidden (--input), -fp16 / -bf16 (--wire-dtype), -uint8 / -float (--pixels), -special "
                         "(--anchors special), -log / -matched (--count-bias), -m8 / -m16 (means per partition), "
                         "e.g. prism-local-fp16")
    ap.add_argument("--no-single", action="store_true", help="skip the standalone single-device launch")
    args = ap.parse_args()

    import torch
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"latency_{args.tag}.csv"
    cpu = cpu_model()
    cpu_probe = out_dir / f"latency_{args.tag}_cpu.json"
    cond = {"cpu_scaling": json.loads(cpu_probe.read_text()) if cpu_probe.exists() else None, "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads_per_rank": 1,
            "batch": 1, "delay_ms": args.delay_ms, "repeat": args.repeat, "warmup": args.warmup}
    rows = []
    fields = ["model", "mode", "P", "bandwidth_mbit", "delay_ms", "median_ms", "min_ms", "max_ms", "runs",
              "single_median_ms", "change_vs_single_pct", "wait_ms_rank0", "wait_ms_rank1",
              "total_ms_rank0", "total_ms_rank1", "post_ms_rank0", "post_ms_rank1", "input", "wire_dtype",
              "startup_bytes_rank1", "wire", "bytes_per_layer_rank0", "bytes_per_layer_rank1", "sizes",
              "loadavg_before", "loadavg_after", "cpu", "torch"]
    bws = [int(b) for b in args.bandwidths.split(",")]
    for model in args.models.split(","):
        # every voltage / prism launch also times the stock model alone on rank 0 before each
        # of its runs (--interleave-single), so each P = 2 figure has a single-device figure
        # taken under the same machine load; a standalone single run starts each model.
        plan = ([] if args.no_single else [("single", None)]) + \
            [(m, bw) for bw in bws for m in args.modes.split(",")]
        for mode, bw in plan:
            if bw is not None:
                shape(args.ns0, args.dev0, bw, args.delay_ms)
                shape(args.ns1, args.dev1, bw, args.delay_ms)
            la0 = os.getloadavg()[0]
            d = run_ranks(args, model, mode, 1 if mode == "single" else 2)
            la1 = os.getloadavg()[0]
            ts = [t * 1e3 for t in d["times_s"]]
            lb = d.get("layer_bytes_per_rank", [{}])
            row = {"model": model, "mode": mode, "P": d["world"], "bandwidth_mbit": bw if bw else "",
                   "delay_ms": args.delay_ms if bw else "", "median_ms": round(sorted(ts)[len(ts) // 2], 2),
                   "min_ms": round(min(ts), 2), "max_ms": round(max(ts), 2), "runs": len(ts),
                   "single_median_ms": round(d["single_median_s"] * 1e3, 2) if "single_median_s" in d else "",
                   "change_vs_single_pct": round(100 * (d["median_s"] / d["single_median_s"] - 1), 1)
                   if "single_median_s" in d else "",
                   "wait_ms_rank0": round(d["median_wait_s_per_rank"][0] * 1e3, 1) if mode != "single" else "",
                   "wait_ms_rank1": round(d["median_wait_s_per_rank"][1] * 1e3, 1) if mode != "single" else "",
                   "total_ms_rank0": per_rank(d, "median_total_s_per_rank", 0),
                   "total_ms_rank1": per_rank(d, "median_total_s_per_rank", 1),
                   "post_ms_rank0": per_rank(d, "median_post_s_per_rank", 0),
                   "post_ms_rank1": per_rank(d, "median_post_s_per_rank", 1),
                   "input": d.get("input", ""), "wire_dtype": d.get("wire_dtype", ""),
                   "startup_bytes_rank1": (d.get("startup_bytes_per_rank") or ["", ""])[-1],
                   "wire": d.get("wire") if mode != "single" else "",
                   "bytes_per_layer_rank0": max(lb[0].values(), default=0) if lb else 0,
                   "bytes_per_layer_rank1": max(lb[1].values(), default=0) if len(lb) > 1 else "",
                   "sizes": " ".join(str(x) for x in d.get("sizes") or []),     # partition sizes run
                   "loadavg_before": round(la0, 2), "loadavg_after": round(la1, 2),
                   "cpu": cpu, "torch": torch.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
    (out_dir / f"latency_{args.tag}.json").write_text(json.dumps({"conditions": cond, "rows": rows}, indent=1))
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()

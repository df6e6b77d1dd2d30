"""How much two ranks can gain on this machine at all: time the blocks of a model on
half the tokens (what one of P = 2 devices computes) in one process alone, then in two
processes at once (pinned to CPU 0 and CPU 1, one thread each), and the whole model on
one process. On two real cores, two concurrent halves take as long as one half alone;
if they take twice as long, the two vCPUs share one physical core's throughput and no
P = 2 split can cut latency, whatever the network.

    python benchmarks/netem/cpu_scaling.py [--family vit] [--size base] [--tokens 197] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402


def child(args):
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from prism_kernels.models import lookup
    entry = lookup(args.family)
    m = entry.build_model(args.size)
    m.set_attn_implementation("sdpa")
    blocks = entry.blocks(m)
    h0 = torch.randn(1, args.rows, m.config.hidden_size)

    def run():
        h = h0
        with torch.no_grad():
            for b in blocks:
                h = entry.run_block(m, b, h, torch.arange(args.rows))
    run()
    Path(args.ready).touch()
    while not all(Path(p).exists() for p in args.wait_for.split(",")):
        time.sleep(0.01)
    ts = []
    for _ in range(args.reps):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    print(json.dumps(sorted(ts)[len(ts) // 2]))


def measure(args, rows, cpus, tag):
    procs = []
    readies = [os.path.join(tempfile.gettempdir(), f"pk_cpu_ready_{os.getpid()}_{tag}_{c}") for c in cpus]
    for r in readies:
        Path(r).unlink(missing_ok=True)
    for c, r in zip(cpus, readies):
        cmd = ["taskset", "-c", str(c), sys.executable, __file__, "--child", "--family", args.family, "--size",
               args.size, "--rows", str(rows), "--reps", str(args.reps), "--ready", r, "--wait-for", ",".join(readies)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    out = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    for r in readies:
        Path(r).unlink(missing_ok=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="vit")
    ap.add_argument("--size", default="base")
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--ready")
    ap.add_argument("--wait-for")
    args = ap.parse_args()
    if args.child:
        return child(args)
    half = (args.tokens + 1) // 2
    full = measure(args, args.tokens, [0], "full")[0]
    alone = measure(args, half, [0], "alone")[0]
    both = measure(args, half, [0, 1], "both")
    res = {"family": args.family, "size": args.size, "tokens": args.tokens, "half_rows": half,
           "full_one_process_ms": round(full * 1e3, 1), "half_alone_ms": round(alone * 1e3, 1),
           "half_two_processes_ms": [round(t * 1e3, 1) for t in both],
           "slowdown_when_both_cpus_busy": round(max(both) / alone, 2),
           "best_possible_p2_latency_cut_pct": round(100 * (1 - max(both) / full), 1),
           "loadavg": os.getloadavg()[0], "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "cpu": cpu_model(),
           "cores": os.cpu_count()}
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

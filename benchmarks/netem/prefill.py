"""Prefill latency of a long prompt: `prism generate` with P = 2 over the shaped veth pair
against the stock model on one device (a decoder's prefill: one forward over the prompt,
logits of its last token only, as `generate` does).

Run through run_prefill.sh (root: it creates the namespaces, netns.sh). Every launch is a
fresh pair of processes, one torch thread each, rank r pinned to CPU r, and measures one
prefill: the first forward of the process, for Prism and for the single device alike
(`prism generate` prefills once). Launches alternate single / prism so both see the same
machine load; the medians over --launches are compared.
Writes benchmarks/results/prefill_<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import shape  # noqa: E402

SINGLE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from transformers import AutoModelForCausalLM
from prism_kernels.models import lookup
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = lookup(m).make_input(m.config, int(sys.argv[2]), seed=0)
with torch.no_grad():
    t = time.perf_counter()
    out = m(ids, logits_to_keep=1)
    dt = time.perf_counter() - t
print(json.dumps({"prefill_s": dt, "next_token": int(out.logits[0, -1].argmax())}))
"""


def env_for(args, r, port):
    return {"PATH": os.environ["PATH"], "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
            "MASTER_ADDR": args.addr0, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": (args.dev0, args.dev1)[r],
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "HOME": os.environ.get("HOME", "/root")}


def in_ns(ns, env, r, argv):
    return ["ip", "netns", "exec", ns, "env", "-i"] + [f"{k}={v}" for k, v in env.items()] + \
        ["taskset", "-c", str(r % (os.cpu_count() or 1)), sys.executable] + argv


def single(args):
    cmd = in_ns(args.ns0, env_for(args, 0, 0), 0, ["-c", SINGLE, args.model, str(args.tokens), str(ROOT)])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"single failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def prism(args, port):
    flags = ["-m", "prism_kernels.distributed.generate", "--model", args.model, "--seq-len", str(args.tokens),
             "--max-new-tokens", "1", "--cr", str(args.cr), "--json", "--threads", "1", "--timeout", "300"]
    flags += args.extra.split() if args.extra else []
    procs = [subprocess.Popen(in_ns((args.ns0, args.ns1)[r], env_for(args, r, port), r, flags), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise SystemExit(f"prism rank {r} failed ({p.returncode}): {e[-2000:]}")
    return json.loads([l for l in outs[1][0].splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    for a in ("--ns0", "--ns1", "--dev0", "--dev1", "--addr0", "--model"):
        ap.add_argument(a, required=True)
    ap.add_argument("--mbit", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--cr", type=float, default=10.0)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--extra", default="", help="more prism generate flags, e.g. '--wire-dtype fp16'")
    ap.add_argument("--port", type=int, default=29911)
    ap.add_argument("--tag", default="smollm2")
    args = ap.parse_args()
    shape(args.ns0, args.dev0, args.mbit, 0.0)
    shape(args.ns1, args.dev1, args.mbit, 0.0)
    rows = []
    for i in range(args.launches):
        la = os.getloadavg()[0]
        s = single(args)
        p = prism(args, args.port + i)
        rows.append({"launch": i, "single_s": s["prefill_s"], "prism_s": p["prefill_s"], "loadavg_before": round(la, 2),
                     "startup_bytes_per_rank": p["startup_bytes_per_rank"],
                     "prefill_layer_bytes_per_rank": p["prefill_layer_bytes_per_rank"], "sizes": p["sizes"],
                     "means": p["means"], "single_next_token": s["next_token"], "prism_next_token": p["tokens"][0]})
        print(json.dumps(rows[-1]), flush=True)
    cpu = cpu_model()
    import torch
    med_s = statistics.median(r["single_s"] for r in rows)
    med_p = statistics.median(r["prism_s"] for r in rows)
    cond = {"model": args.model, "tokens": args.tokens, "cr": args.cr, "mbit": args.mbit, "launches": args.launches,
            "extra": args.extra, "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    out = ROOT / "benchmarks" / "results"
    (out / f"prefill_{args.tag}.json").write_text(json.dumps({"conditions": cond, "rows": rows}, indent=1))
    md = [f"# Prefill latency, P = 2 over {args.mbit} Mbit/s ({args.tag})", "",
          "`benchmarks/netem/run_prefill.sh`: two network namespaces joined by a veth pair shaped with tc tbf, "
          "one torch thread per rank, rank r on CPU r. Each launch measures one prefill in fresh processes "
          "(the first forward of the process): the stock model alone on rank 0's CPU (logits of the last "
          "token only), then `prism generate --max-new-tokens 1` with P = 2 (time until the last rank "
          "holds its logits; the slowest rank's prefill time). Random token ids, fp32.", "",
          f"Conditions: `{json.dumps(cond)}`", "",
          "| launch | single (ms) | prism P = 2 (ms) | load before |", "|---|---|---|---|"]
    md += [f"| {r['launch']} | {r['single_s'] * 1e3:.0f} | {r['prism_s'] * 1e3:.0f} | {r['loadavg_before']} |" for r in rows]
    md += ["", f"Medians: single {med_s * 1e3:.0f} ms, prism {med_p * 1e3:.0f} ms, change "
               f"{100 * (med_p / med_s - 1):+.1f}%.", ""]
    (out / f"prefill_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

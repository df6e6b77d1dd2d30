"""What one Prism rank computes beyond the stock blocks, without any network: rank 0 of
P = 2 runs `Runtime.run_blocks` (embedding of its slice, every block with the means'
K/V projections, both attention calls and their merge) with an exchange that completes
at once (zeros received), against the stock blocks (sdpa) on the same number of rows.
Interleaved in one process, one thread; medians and their ratio.

    python benchmarks/netem/rank_overhead.py [--family vit|bert] [--count-bias auto|log|matched|matched_cls]
                                             [--repeat 9] [--out FILE] [--profile] [--parts]

--parts also times the runtime's own pieces (segment choice, matched rows, the merge of the
two attention calls, ...) by wrapping them, and reports ms per inference for each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402
sys.path.insert(0, str(ROOT))

from prism_kernels.config import PrismConfig  # noqa: E402
from prism_kernels.distributed import overlap  # noqa: E402
from prism_kernels.distributed.runtime import RunConfig, Runtime  # noqa: E402
from prism_kernels.models import lookup  # noqa: E402


class _Done:
    def __init__(self, send, recv):
        self.send, self.recv = send, recv

    def wait(self, timeout_s=None):
        # rank 1's message stands in as a copy of rank 0's own (same size at P = 2 when
        # both partitions send as many rows): valid counts (>= 1) when the segments are
        # data-dependent; zeros where the sizes differ
        mine = next(iter(self.send.values()), None)
        return {j: mine.clone().view_as(b) if mine is not None and mine.dtype == b.dtype
                and mine.numel() == b.numel() else torch.zeros_like(b) for j, b in self.recv.items()}


class InstantComm:
    """Rank 0 of 2; every exchange has already arrived (a copy of what rank 0 sent)."""
    rank, world, timeout_s, wait_s, post_s = 0, 2, 60.0, 0.0, 0.0

    def start(self, what, phase, layer, send, recv):
        return _Done(send, recv)


def _wrap_parts():
    """Wrap the runtime's own pieces with timers: ({name: seconds}, {name: calls})."""
    import collections
    import functools
    from prism_kernels.distributed import runtime as R
    acc, calls = collections.Counter(), collections.Counter()

    def wrap(obj, name, label):
        f = getattr(obj, name)

        @functools.wraps(f)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t
                calls[label] += 1
        setattr(obj, name, timed)
    wrap(R.LayerCtx, "segments", "segment choice")
    wrap(R, "matched_summary", "matched rows")
    wrap(R.LayerCtx, "_post_matched", "message assembly and post")
    wrap(R.LayerCtx, "receive_kv", "unpack received rows")
    wrap(overlap, "merge_by_lse", "merge of the two attention calls")
    wrap(overlap, "prism_distributed_attention", "attention function in all")
    wrap(R.Runtime, "_embed_own", "embedding of the rank's slice")
    wrap(R.Runtime, "run_blocks", "run_blocks")
    return acc, calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="vit", choices=("vit", "bert"))
    ap.add_argument("--means", type=int, default=None, help="means per partition (default: 10 ViT, 1 BERT)")
    ap.add_argument("--count-bias", default="auto", choices=("auto", "log", "matched", "matched_cls"),
                    help="PrismConfig.count_bias (auto: matched rows for BERT, log for ViT)")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", action="store_true",
                    help="also report ms per inference spent in the runtime's own pieces (wrapped)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler tables (by op and input shape) of 3 runs of each instead of timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = _wrap_parts() if args.parts else None
    entry = lookup(args.family)
    model = entry.build_model("base").eval()
    m = args.means or (10 if args.family == "vit" else 1)
    if args.family == "vit":
        inputs, n = torch.randn(1, 3, 224, 224), 197
    else:
        inputs, n = torch.randint(0, 1000, (1, 256)), 256
    overlap.register()
    model.set_attn_implementation(overlap.ATTN_NAME)
    rt = Runtime(model, InstantComm(), RunConfig(mode="prism", prism=PrismConfig(num_partitions=2, num_means=m,
                                                                                   count_bias=args.count_bias),
                                                 input="local"), n, input_shape=tuple(inputs.shape),
                 input_dtype=inputs.dtype)
    rows = rt.plan.sizes[0]
    blocks = entry.blocks(model)
    h0 = torch.randn(1, rows, model.config.hidden_size)

    def stock():
        model.set_attn_implementation("sdpa")
        h = h0
        with torch.no_grad():
            for b in blocks:
                h = entry.run_block(model, b, h, torch.arange(rows))
        model.set_attn_implementation(overlap.ATTN_NAME)

    def prism():
        with torch.no_grad():
            rt.run_blocks(inputs)

    times = {"stock": [], "prism": []}
    for f in (stock, prism, stock, prism):
        f()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, f in (("stock", stock), ("prism", prism)):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pr:
                for _ in range(3):
                    f()
            print(f"===== {name} ({args.family}, 3 runs)")
            print(pr.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=int(os.environ.get("ROWS", "12"))))
        return
    la0 = os.getloadavg()[0]
    for _ in range(args.repeat):
        for name, f in (("stock", stock), ("prism", prism)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    s, p = statistics.median(times["stock"]), statistics.median(times["prism"])
    cpu = cpu_model()
    res = {"family": args.family, "rows": rows, "means": m, "count_bias": rt.cfg.prism.bias_for(entry.causal, entry.roles(model.config)), "stock_ms": round(s * 1e3, 1),
           "prism_rank_ms": round(p * 1e3, 1), "ratio": round(p / s, 3), "repeat": args.repeat,
           "loadavg_before": round(la0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "cpu": cpu, "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if parts is not None:
        runs = parts[1]["run_blocks"] or 1
        res["parts_ms_per_inference"] = {k: round(v / runs * 1e3, 2) for k, v in parts[0].items()
                                         if k != "run_blocks"}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

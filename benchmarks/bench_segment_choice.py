"""Cost of choosing a partition's segments from its keys (prism_kernels.dynamic), per layer
and partition, at the shapes of the project's benchmarks: what the data-dependent default
adds to a rank's work in every layer. One thread; medians of fresh random keys (so the
top-1 token, and the 2-D block table, change from call to call).

    PYTHONPATH=. python benchmarks/bench_segment_choice.py [--out benchmarks/results/segment_choice.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

from prism_kernels import dynamic
from prism_kernels.anchors import TokenRoles, resolve
from prism_kernels.config import PrismConfig

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    # label, tokens, P, means per partition, roles, key width (Hkv * d), policy
    ("ViT-B/16, 197 tokens, m = 10 (default: top-1 key norm, 2-D blocks)", 197, 2, 10,
     TokenRoles(leading=1, patch_grid=(14, 14)), 768, {}),
    ("BERT-base, 256 tokens, m = 1 (default: no choice)", 256, 2, 1, TokenRoles(leading=1, trailing=1), 768, {}),
    ("GPT-2, 256 tokens, CR 10 (default: top-1 key deviation, content runs)", 256, 2, 13, TokenRoles(), 768, {}),
    ("GPT-2, 256 tokens, CR 10, segments=content_sse", 256, 2, 13, TokenRoles(), 768,
     {"segments": "content_sse"}),
    ("SmolLM2, 1024 tokens, CR 10 (default)", 1024, 2, 52, TokenRoles(), 192, {}),
    ("SmolLM2, 1024 tokens, CR 10, segments=content_sse", 1024, 2, 52, TokenRoles(), 192,
     {"segments": "content_sse"}),
]


def median_ms(cfg, n, roles, F, reps=15):
    plan = cfg.plan(n, False, roles=roles, static=True)
    anchors, grid = resolve(n, roles, cfg.anchors, cfg.segments)
    part = plan.partitions[0]
    fixed = dynamic.fixed_anchors(part, anchors)
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, part.size, F, generator=g) for _ in range(2 * reps)]
    for k in keys[:reps]:                                   # warm-up (and the block-table cache)
        dynamic.partition_segments(cfg, k, part, fixed, grid)
    times = []
    for k in keys[reps:]:
        t0 = time.perf_counter()
        dynamic.partition_segments(cfg, k, part, fixed, grid)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), dynamic.chooses(cfg, part, fixed, grid)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segment_choice.md"))
    ap.add_argument("--note", default="", help="conditions to record (e.g. what else ran)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# Choosing segments from the keys: cost per layer and partition", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, one thread; load average before the run {os.getloadavg()[0]:.2f}. "
             "Median of 15 calls on fresh random keys (after 15 warm-up calls). " + args.note, "",
             "| shape and policy | partition has a choice | ms per layer |", "|---|---|---|"]
    for label, n, P, m, roles, F, policy in CASES:
        ms, choice = median_ms(PrismConfig(P, num_means=m, **policy), n, roles, F)
        lines.append(f"| {label} | {'yes' if choice else 'no (sent as a static plan)'} | {ms:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

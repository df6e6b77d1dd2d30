"""prism::matched_rows: the C++ kernel against the PyTorch composite (torch_backend), one
thread, on the shapes the runtime builds rows for in every layer: ViT-B/16 rank 0 of 2
(99 rows, 12 heads of 64, 10 rows matched at the [CLS] query) and BERT-base (128 rows,
one row). Warm cache (the same inputs every call); medians of repeated blocks.

    python benchmarks/bench_matched_rows.py [--out benchmarks/results/matched_rows_bench.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402
sys.path.insert(0, str(ROOT))

import prism_kernels as pk  # noqa: E402
from prism_kernels import torch_backend  # noqa: E402

SHAPES = {"vit-b16 rank 0": (99, 12, 64, 10), "bert-base rank 0": (128, 12, 64, 1)}


def median_us(f, calls=200, blocks=15):
    for _ in range(20):
        f()
    per = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        per.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(per)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not pk.cpp_variant():
        raise SystemExit("the C++ extension is not built (python -m prism_kernels.build)")
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, H, d, m) in SHAPES.items():
        q0 = torch.randn(1, H, d, generator=g)
        k, v = torch.randn(1, n, H * d, generator=g), torch.randn(1, n, H * d, generator=g)
        seg = (torch.arange(n) * m // n)[None]
        s = d ** -0.5
        composite = median_us(lambda: torch_backend.matched_rows(q0, k, v, seg, m, s))
        kernel = median_us(lambda: torch.ops.prism.matched_rows(q0, k, v, seg, m, s, backend="cpp"))
        rows.append({"shape": name, "n": n, "heads": H, "d": d, "m": m, "composite_us": round(composite, 1),
                     "cpp_us": round(kernel, 1), "speedup": round(composite / kernel, 2)})
        print(json.dumps(rows[-1]))
    res = {"rows": rows, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__,
           "cpp_variant": pk.cpp_variant(), "loadavg": round(os.getloadavg()[0], 2),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

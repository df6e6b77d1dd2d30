"""CPU benchmark of prism segment_means against a same-size tensor copy
(the bandwidth bar) and what a PyTorch user would write.

Methods (medians of interleaved runs, 1 thread and all threads):
  cpp        torch.ops.prism.segment_means (C++ kernel, one pass over x)
  reference  python_ref.segment_means (split + stack of means)
  torch      x.view(..., m, n/m, D).mean(-2) where segments are equal
             (the one-liner a user would write; n/a otherwise)
  copy       dst.copy_(x) into a preallocated tensor: reads and writes n*D elements

Bandwidth counts bytes read + written once: cpp (n + m)*D*itemsize,
copy 2*n*D*itemsize. Target: cpp >= 70% of the copy bandwidth.

Usage: python benchmarks/bench_cpu_segment_means.py [--quick]
Appends to benchmarks/results/cpu_segment_means.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prism_kernels as pk  # noqa: E402,F401  (registers the ops)
import python_ref  # noqa: E402
from common import fmt_time, format_table, interleaved_medians, machine_info, write_result  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_segment_means.md")


def cases(quick):
    # (leading dims, n, D, m, dtype)
    c = [
        ((1,), 99, 768, 10, torch.float32),        # ViT partition -> 10 means
        ((1,), 128, 768, 13, torch.float32),       # BERT / GPT-2 partition
        ((1,), 2048, 768, 256, torch.float32),
        ((1,), 8192, 768, 256, torch.float32),
        ((1,), 8192, 768, 1, torch.float32),
        ((1,), 8192, 768, 2048, torch.float32),
        ((4,), 8192, 1024, 512, torch.float32),
        ((1,), 8192, 768, 256, torch.bfloat16),
        ((12,), 2048, 64, 128, torch.float16),
    ]
    return [c[1], c[3], c[6], c[7]] if quick else c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    assert pk.cpp_variant(), "build the C++ extension first"
    all_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        for lead, n, D, m, dtype in cases(args.quick):
            x = torch.randn(*lead, n, D).to(dtype)
            dst = torch.empty_like(x)  # preallocated: copy bandwidth without page faults
            fns = {
                "cpp": lambda: torch.ops.prism.segment_means(x, m),
                "reference": lambda: python_ref.segment_means(x, m),
                "copy": lambda: dst.copy_(x),
            }
            if n % m == 0:
                fns["torch"] = lambda: x.view(*lead, m, n // m, D).mean(-2)
            got = torch.ops.prism.segment_means(x, m)[0].double()
            ref = python_ref.segment_means(x.double(), m)[0]
            assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), "cpp disagrees with reference"
            med = {k: v["median"] for k, v in interleaved_medians(
                fns, reps=7 if args.quick else 15, min_time=5e-3).items()}
            isz = x.element_size()
            L = x.numel() // (n * D)
            bw_cpp = L * (n + m) * D * isz / med["cpp"] / 1e9
            bw_copy = 2 * x.numel() * isz / med["copy"] / 1e9
            rows.append([
                f"{list(lead)}x{n}x{D} m={m} {str(dtype).replace('torch.', '')}", threads,
                fmt_time(med["cpp"]), fmt_time(med["reference"]), fmt_time(med.get("torch")),
                fmt_time(med["copy"]), f"{bw_cpp:.1f}", f"{bw_copy:.1f}",
                f"{100 * bw_cpp / bw_copy:.0f}%", f"{med['reference'] / med['cpp']:.1f}x",
            ])
            print(rows[-1], flush=True)
    info = machine_info()
    info["threads"] = f"1 and {all_threads}"
    table = format_table(["case", "thr", "cpp", "reference", "torch view.mean", "copy",
                          "cpp GB/s", "copy GB/s", "cpp/copy bw", "ref/cpp"], rows)
    body = ("Median time per call. Bandwidth = bytes read + written once "
            "(cpp: (n + m) * D, copy: 2 * n * D elements).\n\n" + table + "\n")
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(body)
    write_result(RESULTS, "segment_means, CPU" + (" (quick)" if args.quick else ""), info, body,
                 append=True)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Check and time the Triton kernels of prism-kernels on one NVIDIA GPU.

    python benchmarks/gpu_check.py                 # GPU: check fp32/bf16/fp16, then benchmark
    python benchmarks/gpu_check.py --interpret     # CPU, Triton interpreter: check only, tiny shapes
    python benchmarks/gpu_check.py --out DIR       # where results go (default benchmarks/results)
    python benchmarks/gpu_check.py --compile-only  # no GPU: compile the kernels for sm_90, run nothing

Part 1, check (benchmarks/gpu/check.py): for every case and dtype, fresh random inputs (a new seed per run,
printed), the allocator poisoned with NaN before each kernel call (the kernels
allocate their outputs; the caching allocator hands back the NaN-filled block, so
an element the kernel forgets to write stays NaN), then the relative error
max|out - ref| / max|ref| against python_ref computed in fp32 from the same
(rounded) inputs. NaN never passes. lse is checked too (finite exactly where the
reference is, close there). Benchmark shapes are spot-checked on a sample of
query rows (the reference cannot hold a 32k x 40k score matrix).

Part 2, benchmark (benchmarks/gpu/timing.py, GPU only): triton.testing.do_bench medians of
  * prism Triton kernel (this package),
  * FlexAttention, torch.compile'd, score_mod = + log count, block mask from positions,
  * SDPA with the equivalent float mask (log counts, -inf where masked),
  * SDPA over the full uncompressed sequence (what Voltage / a single device runs),
in bf16, TFLOP/s (useful FLOPs: 4 d per visible query-key pair) next to the bf16
matmul rate measured in the same run; a decode step (one new query over 1k-64k
cached keys: the split-K path against the general kernel and SDPA, and on the
compressed Prism cache; gpu.timing.bench_decode); plus segment means against the copy
bandwidth and the plain-PyTorch backend. Everything runs under a wall-clock budget (default 280 s of work) so
the script ends within 6 minutes; shapes that did not fit are listed as skipped.
Results: <out>/<gpu-name>.md and .csv.

Works with torch >= 2.5 and Triton >= 3.0 (tested under the interpreter with
torch 2.13 / Triton 3.7; written for the device box's torch 2.11 / Triton 3.6).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):  # prism_kernels / python_ref, and the gpu/ package next to this file
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _early_interpret_flag(argv):
    # TRITON_INTERPRET must be set before Triton decorates any kernel.
    if "--interpret" in argv:
        os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    _early_interpret_flag(sys.argv[1:])

import torch  # noqa: E402

from gpu.check import (  # noqa: E402,F401  (re-exported: tests and users call them here)
    COMPILE_VARIANTS, DTYPE_NAME, GPU_ATTN_CASES, GPU_DECODE_CASES, GPU_SEG_CASES,
    INTERPRET_ATTN_CASES, INTERPRET_DECODE_CASES,
    INTERPRET_SEG_CASES, LSE_TOL, MATCHED_CASES, REL_TOL, check_attention_case, check_segment_case, compile_only,
    make_attention_inputs, run_checks)
from gpu.timing import (  # noqa: E402,F401
    DECODE_MODELS, PAPER_SHAPES, bench_attention_shape, bench_decode, bench_segment_means, long_shapes, write_results)
from gpu import timing as _timing  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret", action="store_true",
                    help="CPU only, Triton interpreter: run the checks on tiny fp32/fp16 shapes")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds of work before remaining benchmarks are skipped")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile the kernels for sm_90 (or --arch) and stop")
    ap.add_argument("--arch", type=int, default=90, help="with --compile-only: the sm_ version")
    args = ap.parse_args(argv)
    t0 = time.time()

    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("--compile-only needs TRITON_INTERPRET unset")
            return 2
        failures = compile_only(arch=args.arch)
        print(f"{'FAILED' if failures else 'all compiled'} in {time.time() - t0:.0f} s")
        return 1 if failures else 0

    if args.interpret or not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("no CUDA device: rerun with --interpret (sets TRITON_INTERPRET=1 before import)")
            return 2
        print("Triton interpreter on CPU: checks only (fp32, fp16; bf16 is wrong under the interpreter)")
        rows = run_checks(torch.device("cpu"), [torch.float32, torch.float16],
                          INTERPRET_ATTN_CASES, INTERPRET_SEG_CASES, seed=args.seed)
        bad = [r for r in rows if not r["ok"]]
        print(f"{len(rows) - len(bad)}/{len(rows)} checks passed in {time.time() - t0:.1f} s")
        return 1 if bad else 0

    import triton
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    print(f"{gpu}: {versions}")
    deadline = t0 + args.budget
    from prism_kernels.triton_kernels.attention import fixed_config
    # one fixed config for the many check shapes (autotuning each would cost minutes of
    # compiles); the autotuned configs are spot-checked on every benchmark shape below
    with fixed_config():
        checks = run_checks(device, [torch.float32, torch.bfloat16, torch.float16],
                            GPU_ATTN_CASES, GPU_SEG_CASES, seed=args.seed, matched_cases=MATCHED_CASES)
    print(f"checks done at {time.time() - t0:.0f} s")
    matmul = _timing._matmul_tflops(device)
    print(f"bf16 matmul: {matmul:.0f} TFLOP/s")
    seg_rows = bench_segment_means(device, deadline)
    for r in seg_rows:
        print("  segment_means", r)
    flex = _timing._flex_fns()
    attn_rows = []
    for shape in PAPER_SHAPES + long_shapes():
        if time.time() > deadline:
            label = shape[0]
            print(f"  {label}: skipped (time budget)")
            attn_rows.append(dict(shape=label, B=shape[1], H=shape[2], Hkv=shape[3], d=shape[4],
                                  Nq="-", Nk="-", causal=shape[9], check="-",
                                  prism_note="skipped (time budget)"))
            continue
        r = bench_attention_shape(shape, device, deadline, flex)
        attn_rows.append(r)
        print("  " + ", ".join(f"{k}={(round(v, 3) if isinstance(v, float) else v)}" for k, v in r.items()))
    decode_rows = bench_decode(device, deadline + 40)  # a decode step is quick: a little extra
    for r in decode_rows:
        print("  decode " + ", ".join(f"{k}={(round(v, 4) if isinstance(v, float) else v)}"
                                      for k, v in r.items()))
    path_md, path_csv = write_results(args.out, gpu, versions, checks, matmul, attn_rows, seg_rows,
                                      time.time() - t0, decode_rows=decode_rows)
    print(f"wrote {path_md} and {path_csv} in {time.time() - t0:.0f} s")
    return 1 if any(not r["ok"] for r in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark of the fused prism attention kernel against what a PyTorch
user would write instead, side by side in one process.

Methods (fp32, B = 1, d = 64):
  fused       torch.ops.prism.attention (C++ kernel, kernel-form arguments)
  fused_api   prism_kernels.prism_attention (adds the Python argument checks)
  dup         python_ref.duplicated_attention (Eq. 11, the pre-optimisation form)
  sdpa_mask   F.scaled_dot_product_attention with the equivalent float mask
              (log-count bias + -inf where causal), mask built in the call
  sdpa_pre    same, mask prebuilt outside the timed region (favours SDPA)
  flex        torch.compile(flex_attention), score_mod adds the log count,
              block mask (prebuilt) for the causal layout
  full        SDPA over the full uncompressed sequence (one device, no Prism)
  mm          torch.mm 2048^3 fp32 (matmul rate reference, long shapes only)

Medians of interleaved runs, single-threaded and with all threads. Peak extra
memory is measured in a child process per method (VmHWM after a reset, with
glibc's mmap threshold lowered to 16 KiB so blocks are fresh pages and freed
blocks are returned), minus the output. It counts pages touched: allocations
under 16 KiB reused from the heap are not seen.

Usage: python benchmarks/bench_cpu_attention.py [--quick | --paper] [--no-memory] [--no-flex]
  --paper: the six paper shapes only, single thread (no memory table).
Writes benchmarks/results/cpu_attention.md (appends a section per run).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prism_kernels as pk  # noqa: E402
import python_ref  # noqa: E402
from common import (fmt_bytes, fmt_time, format_table, interleaved_medians,  # noqa: E402
                    machine_info, write_result)
from python_ref.layout import device_tensors, plan_layout  # noqa: E402

D_HEAD = 64
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_attention.md")


def shape(name, N, P, i, m, causal, H, paper):
    return dict(name=name, N=N, P=P, i=i, m=m, causal=causal, H=H, paper=paper)


def all_shapes(quick, paper_only=False):
    paper = [
        shape("ViT 99+10", 197, 2, 0, 10, False, 12, True),
        shape("BERT 128+1", 256, 2, 0, 1, False, 12, True),
        shape("BERT 128+13", 256, 2, 0, 13, False, 12, True),
        shape("GPT-2 128+13 causal", 256, 2, 1, 13, True, 12, True),
        shape("GPT-2 128+32 causal", 256, 2, 1, 32, True, 12, True),
        shape("GPT-2 128+64 causal", 256, 2, 1, 64, True, 12, True),
    ]
    long = []
    # Long partitions: P = 2, device 1 when causal (it sees partition 0's means),
    # device 0 otherwise; H = 2 heads keeps a full run under 10 minutes.
    # (8192, CR 4, non-causal is left out: flex alone takes ~5 s a call there.)
    for n, cr, causal in ((2048, 4, False), (2048, 4, True), (2048, 32, False), (2048, 32, True),
                          (8192, 4, True), (8192, 32, False), (8192, 32, True)):
        long.append(shape(f"{n}+{n // cr} (CR {cr}){' causal' if causal else ''}",
                          2 * n, 2, 1 if causal else 0, n // cr, causal, 2, False))
    if paper_only:
        return paper
    if quick:
        return [paper[0], paper[3], long[1], long[-1]]
    return paper + long


def build_inputs(s, seed=0):
    plan = plan_layout(s["N"], s["P"], s["m"], causal=s["causal"])
    counts, q_pos, k_pos = device_tensors(plan, s["i"])
    g = torch.Generator().manual_seed(seed)
    H, Nq, Nk = s["H"], len(q_pos), len(k_pos)
    q = torch.randn(1, H, Nq, D_HEAD, generator=g)
    k = torch.randn(1, H, Nk, D_HEAD, generator=g)
    v = torch.randn(1, H, Nk, D_HEAD, generator=g)
    lc = counts.float().log()[None]
    qp, kp = (q_pos[None], k_pos[None]) if s["causal"] else (None, None)
    return dict(q=q, k=k, v=v, counts=counts, lc=lc, qp=qp, kp=kp, Nq=Nq, Nk=Nk,
                scale=1 / math.sqrt(D_HEAD))


def make_methods(s, x, names, flex_cache):
    q, k, v, lc, qp, kp, scale = x["q"], x["k"], x["v"], x["lc"], x["qp"], x["kp"], x["scale"]
    causal = s["causal"]
    fns = {}

    def build_mask():
        mask = lc[:, None, None, :].expand(1, 1, x["Nq"], x["Nk"])
        if causal:
            vis = kp[:, None, None, :] <= qp[:, None, :, None]
            return mask.masked_fill(~vis, float("-inf"))
        return mask.contiguous()

    if "fused" in names:
        fns["fused"] = lambda: torch.ops.prism.attention(q, k, v, lc, qp, kp, scale)[0]
    if "fused_api" in names:
        fns["fused_api"] = lambda: pk.prism_attention(
            q, k, v, key_counts=x["counts"], causal=causal,
            q_pos=qp[0] if causal else None, k_pos=kp[0] if causal else None)
    if "dup" in names:
        fns["dup"] = lambda: python_ref.duplicated_attention(
            q, k, v, x["counts"], causal=causal,
            q_pos=qp[0] if causal else None, k_pos=kp[0] if causal else None)
    if "sdpa_mask" in names:
        fns["sdpa_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=build_mask(),
                                                                  scale=scale)
    if "sdpa_pre" in names:
        pre = build_mask()
        fns["sdpa_pre"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=pre, scale=scale)
    if "flex" in names:
        fl = make_flex(s, x, flex_cache)
        if fl is not None:
            fns["flex"] = fl
    if "full" in names:
        g = torch.Generator().manual_seed(1)
        N = s["N"]
        qf, kf, vf = (torch.randn(1, s["H"], N, D_HEAD, generator=g) for _ in range(3))
        fns["full"] = lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
    if "mm" in names:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        fns["mm"] = lambda: torch.mm(a, b)
    return fns


def make_flex(s, x, cache):
    key = s["name"]
    if key in cache:
        return cache[key]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        lc, qp, kp = x["lc"], x["qp"], x["kp"]
        q, k, v, scale = x["q"], x["k"], x["v"], x["scale"]

        def score_mod(score, b, h, qi, ki):
            return score + lc[b, ki]

        bm = None
        if s["causal"]:
            def mask_mod(b, h, qi, ki):
                return kp[b, ki] <= qp[b, qi]
            bm = create_block_mask(mask_mod, 1, None, x["Nq"], x["Nk"], device="cpu")
        # dynamic=False: one static compile per shape (automatic dynamic shapes hit an
        # inductor CPU codegen error on the 2nd shape in torch 2.13).
        import torch._dynamo
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape and thread count
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        compiled = cache.setdefault("_compiled", torch.compile(flex_attention, dynamic=False))
        fn = lambda: compiled(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale)
        fn()  # compile now, outside any timing
    except Exception as e:  # noqa: BLE001 - report, do not abort the benchmark
        print(f"  flex unavailable for {key}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        fn = None
    cache[key] = fn
    return fn


def computed_pairs(s, x):
    """(query, key) pairs the fused kernel multiplies: all, minus skipped causal blocks."""
    Nq, Nk = x["Nq"], x["Nk"]
    if not s["causal"]:
        return Nq * Nk
    qB, kB = block_sizes(Nq, Nk)
    qp, kp = x["qp"][0], x["kp"][0]
    total = 0
    for i0 in range(0, Nq, qB):
        qmax = int(qp[i0:i0 + qB].max())
        rows = min(qB, Nq - i0)
        for j0 in range(0, Nk, kB):
            if int(kp[j0:j0 + kB].min()) <= qmax:
                total += rows * min(kB, Nk - j0)
    return total


def block_sizes(Nq, Nk):
    mod = sys.modules.get(f"prism_kernels.{pk.cpp_variant()}")
    return tuple(mod.block_sizes(Nq, Nk, True))


def check_agreement(fns):
    """Max abs difference of every method's output against fused; drops a
    method that raises (e.g. an inductor compile error) from `fns`."""
    ref = fns["fused"]().double()
    bad = {}
    for name in list(fns):
        if name in ("fused", "full", "mm"):
            continue
        try:
            diff = (fns[name]().double() - ref).abs().max().item()
        except Exception as e:  # noqa: BLE001
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            bad[name] = "failed"
            del fns[name]
            continue
        if not diff < 1e-3:
            bad[name] = diff
    return bad


def dup_too_big(s, x):
    # duplicated_attention materialises [H, Nq, N] scores (several copies): skip past 256 MiB.
    return s["H"] * x["Nq"] * s["N"] * 4 > 2**28


def run_timings(shapes, threads_list, args):
    flex_cache = {}
    results = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for s in shapes:
            x = build_inputs(s)
            names = ["fused", "fused_api", "sdpa_mask", "sdpa_pre", "full"]
            if not dup_too_big(s, x):
                names.append("dup")
            if not args.no_flex:
                names.append("flex")
            if not s["paper"] and x["Nq"] >= 8192:
                names.append("mm")
            fns = make_methods(s, x, names, flex_cache)
            bad = check_agreement(fns)
            big = x["Nq"] >= 8192
            reps = 3 if big else (5 if x["Nq"] >= 2048 else (9 if args.quick else 21))
            # check_agreement already ran every method once (compile, caches).
            med = interleaved_medians(fns, reps=reps, warmup=0 if big else 2,
                                      min_time=0 if big else 5e-3)
            pairs = computed_pairs(s, x)
            results.append(dict(shape=s, threads=threads, med=med, bad=bad, pairs=pairs, x=x))
            print(f"[{threads} thr] {s['name']}: " + ", ".join(
                f"{k} {fmt_time(v['median'])}" for k, v in med.items()), flush=True)
    return results


def timing_table(results):
    headers = ["shape", "thr", "fused", "fused_api", "sdpa_mask", "sdpa_pre", "flex", "dup", "full",
               "vs best(sdpa_mask,flex)", "vs best(sdpa_pre,flex)", "vs dup", "GF/s", "% of mm"]
    rows = []
    for r in results:
        m = {k: v["median"] for k, v in r["med"].items()}
        f = m["fused"]
        best_mask = min(m[k] for k in ("sdpa_mask", "flex") if k in m)
        best_pre = min(m[k] for k in ("sdpa_pre", "flex") if k in m)
        gf = 4 * D_HEAD * r["shape"]["H"] * r["pairs"] / f / 1e9
        mm_rate = 2 * 2048**3 / m["mm"] / 1e9 if "mm" in m else None
        rows.append([
            r["shape"]["name"], r["threads"], *(fmt_time(m.get(k)) for k in
                                                ("fused", "fused_api", "sdpa_mask", "sdpa_pre",
                                                 "flex", "dup", "full")),
            f"{best_mask / f:.2f}x", f"{best_pre / f:.2f}x",
            f"{m['dup'] / f:.1f}x" if "dup" in m else "skipped",
            f"{gf:.1f}",
            f"{100 * gf / mm_rate:.0f}% (mm {mm_rate:.0f} GF/s)" if mm_rate else "",
        ])
    return format_table(headers, rows)


# ------------------------------------------------------------------ memory

MEM_METHODS = ["fused", "sdpa_mask", "flex", "dup", "full"]


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def mem_child(shape_name, method, quick):
    torch.set_num_threads(1)
    s = next(s for s in all_shapes(False) if s["name"] == shape_name)
    x = build_inputs(s)
    fn = make_methods(s, x, [method], {})[method if method != "flex" else "flex"]
    out = fn()
    out_bytes = out.numel() * out.element_size()
    del out
    import gc
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    peak = _status_kb("VmHWM")
    print(f"PEAK {peak - base - out_bytes}")


def run_memory(shapes):
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    for s in shapes:
        x = build_inputs(s)
        row = [s["name"], fmt_bytes(x["Nq"] * D_HEAD * s["H"] * 4)]
        for method in MEM_METHODS:
            if method == "dup" and dup_too_big(s, x):
                row.append("skipped")
                continue
            res = subprocess.run([sys.executable, __file__, "--mem-child", s["name"], method],
                                 env=env, capture_output=True, text=True, timeout=600)
            val = [l for l in res.stdout.splitlines() if l.startswith("PEAK ")]
            row.append(fmt_bytes(max(0, int(val[0].split()[1]))) if val else "error")
            print(f"[mem] {s['name']} {method}: {row[-1]}", flush=True)
        rows.append(row)
    return format_table(["shape", "H*Nq*d*4 (=output)"] + MEM_METHODS, rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 shapes, fewer repetitions")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--paper", action="store_true",
                    help="paper shapes only (H = 12, Nq ~ 100-128), single thread, no memory table")
    ap.add_argument("--mem-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.mem_child:
        return mem_child(*args.mem_child, args.quick)
    assert pk.cpp_variant(), "build the C++ extension first (pip install --no-build-isolation -e .)"
    all_threads = torch.get_num_threads()
    info = machine_info()
    threads_list = [1] if args.paper else sorted({1, all_threads})
    info["threads"] = " and ".join(map(str, threads_list))
    shapes = all_shapes(args.quick, args.paper)
    if args.paper:
        args.no_memory = True
    results = run_timings(shapes, threads_list, args)
    table = timing_table(results)
    bad = [(r["shape"]["name"], r["bad"]) for r in results if r["bad"]]
    body = ("Median time per call (fp32, B = 1, d = 64; paper shapes H = 12, long shapes H = 2). "
            "Ratios: baseline median / fused median. GF/s counts 4*d per (query, key) pair in "
            "the key blocks the kernel does not skip.\n\n" + table + "\n")
    if bad:
        body += f"\nDisagreeing outputs (max abs diff vs fused): {bad}\n"
    if not args.no_memory:
        mem_shapes = [s for s in shapes if s["name"] in (
            "ViT 99+10", "2048+512 (CR 4) causal", "8192+256 (CR 32) causal")]
        body += ("\nPeak extra memory per call beyond inputs and output (1 thread, child "
                 "process, VmHWM):\n\n" + run_memory(mem_shapes) + "\n")
    info["loadavg_end"] = machine_info()["loadavg"]
    print()
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(body)
    if args.paper:
        body += ("\nfp32 with d = 64 and Nk <= 512 takes the kernel's small-problem path (AVX512 "
                 "register-tile GEMMs, 16-key causal tiles); GF/s for the causal rows still counts "
                 "the pairs of the blocked path's 64 x 64 block skipping, so it is approximate.\n")
    suffix = " (quick)" if args.quick else (" (paper shapes)" if args.paper else "")
    write_result(RESULTS, "prism attention, CPU" + suffix, info, body,
                 append=True)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()

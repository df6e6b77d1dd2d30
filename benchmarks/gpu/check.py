"""Correctness part of the GPU check: the Triton kernels against python_ref.

For every case and dtype: fresh random inputs (a new seed per run, printed),
the allocator poisoned with NaN before each kernel call (the kernels allocate
their outputs; the caching allocator hands back the NaN-filled block, so an
element the kernel forgets to write stays NaN), then the relative error
max|out - ref| / max|ref| against python_ref computed in fp32 from the same
(rounded) inputs. NaN never passes. lse is checked too (finite exactly where
the reference is, close there). Also `compile_only`: compile the kernels to a
cubin for sm_<arch> without a GPU.

python_ref is imported here only as the oracle (the reference computations);
the Prism device layouts come from prism_kernels.
"""
from __future__ import annotations

import math
import os
import time

import torch

import prism_kernels as pk
import python_ref  # the oracle
from python_ref.attention import _masked_softmax_attention  # the oracle, kernel-form arguments

# Relative-error bounds (max abs error / max abs reference) per dtype. The
# kernels accumulate in fp32 and round P to the input dtype before P @ V, so the
# half types lose ~2^-8 (bf16) / 2^-11 (fp16) relative per weight.
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# ---------------------------------------------------------------- cases

# attention checks: (name, B, H, Hkv, d, layout)
#   layout ("dev", N, P, m, i, causal): device i of a Prism plan (unsorted key positions)
#   layout ("plain", Nq, Nk, counts): non-causal, random counts (or none)
# flags: "hf" -> q/k/v are transposed views of [B, N, H, d]; "dead" -> some query
# rows see no key at all.
INTERPRET_ATTN_CASES = [
    ("causal-dev2-gqa", 2, 4, 2, 24, ("dev", 50, 3, 4, 2, True), ("hf", "dead")),
    ("plain-odd-d80", 1, 2, 1, 80, ("plain", 19, 23, True), ()),
    ("noncausal-dev0", 1, 2, 2, 16, ("dev", 40, 2, 3, 0, False), ()),
]
# every distinct (dtype, d, causal, counts) is one compile: the last three run in
# one dtype each to keep the check part short
GPU_ATTN_CASES = [
    ("causal-dev3-gqa-d128", 2, 8, 2, 128, ("dev", 4000, 4, 37, 3, True), ("hf", "dead")),
    ("noncausal-dev1-d64", 3, 4, 4, 64, ("dev", 1000, 3, 25, 1, False), ("hf",)),
    ("plain-odd-d80", 2, 4, 1, 80, ("plain", 333, 517, True), ()),
    ("causal-dev1-d64", 2, 6, 6, 64, ("dev", 1500, 3, 100, 1, True), ("only:bf16",)),
    ("plain-d256", 1, 2, 2, 256, ("plain", 200, 300, False), ("only:bf16",)),
    ("plain-d16-tiny", 3, 2, 1, 16, ("plain", 1, 5, True), ("only:fp16",)),
]
# decode-shape cases: layout ("decode", N, P, m, Nq): the Prism cache that device
# P-1 keeps after prefill (its own rows exact, means of the others, with counts)
# and Nq new queries at the last positions (the first ones see fewer keys);
# flag "split:n" forces the split-K decode path with n keys per program, flag
# "decode" fails the check unless that path ran (attention_decode.py).
INTERPRET_DECODE_CASES = [
    ("decode-gqa3-split", 2, 6, 2, 32, ("decode", 120, 2, 6, 2), ("hf", "dead", "split:16", "decode")),
    ("decode-nq1-split", 1, 4, 1, 16, ("decode", 90, 3, 5, 1), ("split:24", "decode")),
]
GPU_DECODE_CASES = [
    ("decode-smollm2-8k", 1, 9, 3, 64, ("decode", 16384, 2, 819, 1), ("hf", "decode")),
    ("decode-llama-nq4-16k", 2, 32, 8, 128, ("decode", 32768, 2, 1638, 4), ("hf", "dead", "decode")),
    ("decode-gpt2-split-odd", 1, 12, 12, 64, ("decode", 3000, 3, 37, 3), ("split:100", "decode")),
]
INTERPRET_ATTN_CASES = INTERPRET_ATTN_CASES + INTERPRET_DECODE_CASES
GPU_ATTN_CASES = GPU_ATTN_CASES + GPU_DECODE_CASES
INTERPRET_SEG_CASES = [((2, 37, 20), 5, False), ((19, 33), 19, False), ((2, 3, 16, 24), 1, True)]
GPU_SEG_CASES = [((4, 1001, 768), 7, False), ((2, 12, 4097, 64), 1, True),
                 ((3000, 96), 3000, False), ((2, 8192, 1024), 512, True)]


def _gen(seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_attention_inputs(B, H, Hkv, d, layout, flags, dtype, device, seed):
    """q, k, v in `dtype` plus kernel-form log_counts / positions (fp32 / int64)."""
    g = _gen(seed, device)
    kind = layout[0]
    if kind == "dev":
        _, N, P, m, i, causal = layout
        plan = pk.plan_layout(N, P, m, causal=causal)
        counts, qp, kp = pk.device_tensors(plan, i, device=device)
        Nq, Nk = qp.numel(), kp.numel()
    elif kind == "decode":
        _, N, P, m, nq = layout
        causal = True
        plan = pk.plan_layout(N, P, m, causal=True)
        counts, _, kp = pk.device_tensors(plan, P - 1, device=device)
        qp = torch.arange(N - nq, N, device=device)
        Nq, Nk = nq, kp.numel()
    else:
        _, Nq, Nk, with_counts = layout
        causal = False
        counts = (torch.randint(1, 9, (Nk,), generator=g, device=device) if with_counts else None)
        qp = kp = None

    def rnd(h, n):
        if "hf" in flags:  # transposed view of [B, n, h, d], as Hugging Face passes it
            return torch.randn(B, n, h, d, generator=g, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, generator=g, device=device).to(dtype)

    q, k, v = rnd(H, Nq), rnd(Hkv, Nk), rnd(Hkv, Nk)
    log_counts = counts.float().log()[None].expand(B, Nk) if counts is not None else None
    if causal:
        q_pos = qp[None].expand(B, Nq)
        k_pos = kp[None].expand(B, Nk)
        if "dead" in flags:  # batch row B-1: the first 3 queries come before every key
            q_pos = q_pos.clone()
            q_pos[B - 1, : min(3, Nq)] = kp.min() - 1
    else:
        q_pos = k_pos = None
    return q, k, v, log_counts, q_pos, k_pos


def _poison(shapes_dtypes, device):
    """Fill blocks of the output sizes with NaN and free them: the caching allocator
    (CUDA) hands the same blocks to the kernel's torch.empty outputs."""
    bufs = [torch.full(s, float("nan"), dtype=dt, device=device) for s, dt in shapes_dtypes]
    del bufs


def _rel_err(out, ref):
    if torch.isnan(out).any():
        return float("nan")
    den = ref.abs().max().clamp_min(1e-6)
    return ((out.double() - ref.double()).abs().max() / den).item()


def check_attention_case(impl, case, dtype, device, seed, rows=None):
    """Run one attention case; returns a dict with rel_err, lse_err, ok, reason.

    rows: optional LongTensor of query rows to compare (spot check of big shapes).
    """
    name, B, H, Hkv, d, layout, flags = case
    q, k, v, lc, qp, kp = make_attention_inputs(B, H, Hkv, d, layout, flags, dtype, device, seed)
    Nq = q.shape[2]
    scale = 1.0 / math.sqrt(d)
    _poison([((B, H, Nq, d), dtype), ((B, H, Nq), torch.float32)], device)
    split = [int(f[6:]) for f in flags if f.startswith("split:")]
    from prism_kernels.triton_kernels import attention_decode as _ad
    calls = _ad.CALLS["split"]
    if split:  # force the split-K decode path with small chunks (exercises the merge)
        with _ad.decode_split(chunk=split[0]):
            out, lse = impl(q, k, v, lc, qp, kp, scale)
    else:
        out, lse = impl(q, k, v, lc, qp, kp, scale)
    if "decode" in flags and _ad.CALLS["split"] == calls:
        return dict(kind="attention", case=name, dtype=DTYPE_NAME[dtype], rel_err=float("nan"),
                    lse_err=float("nan"), ok=False, reason="the split-K decode path did not run")
    if rows is not None:  # batch row 0, first and last query head, sampled query rows
        hsel = [0, H - 1] if H > 1 else [0]
        ksel = [h // (H // Hkv) for h in hsel]
        q, k, v = q[:1, hsel][:, :, rows], k[:1, ksel], v[:1, ksel]
        lc = lc[:1] if lc is not None else None
        qp = qp[:1, rows] if qp is not None else None
        kp = kp[:1] if kp is not None else None
        out, lse = out[:1, hsel][:, :, rows], lse[:1, hsel][:, :, rows]
    # reference in fp32 from the same rounded inputs, not rounded to the dtype
    ref, ref_lse = _masked_softmax_attention(q.float(), k.float(), v.float(), lc, qp, kp, scale, True)
    rel = _rel_err(out, ref)
    reason = ""
    ok = True
    if torch.isnan(out).any() or torch.isnan(lse).any():
        ok, reason = False, "NaN in output or lse"
    elif not rel <= REL_TOL[dtype]:
        ok, reason = False, f"rel err {rel:.2e} > {REL_TOL[dtype]:.0e}"
    fin = torch.isfinite(ref_lse)
    lse_err = 0.0
    if ok:
        if not torch.equal(torch.isfinite(lse), fin):
            ok, reason = False, "lse finite pattern differs (-inf rows)"
        else:
            if fin.any():
                lse_err = (lse[fin].double() - ref_lse[fin].double()).abs().max().item()
            if not lse_err <= LSE_TOL[dtype]:
                ok, reason = False, f"lse err {lse_err:.2e} > {LSE_TOL[dtype]:.0e}"
            dead = ~fin
            if ok and dead.any() and out[dead].abs().max().item() != 0.0:
                ok, reason = False, "rows with no visible key are not exactly zero"
    return dict(kind="attention", case=name, dtype=DTYPE_NAME[dtype], rel_err=rel,
                lse_err=lse_err, ok=ok, reason=reason)


def check_segment_case(impl, case, dtype, device, seed):
    shape, m, transposed = case
    g = _gen(seed, device)
    if transposed:  # non-contiguous: [..., D, n] storage viewed as [..., n, D]
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, device=device)
        x = x.to(dtype).transpose(-1, -2)
    else:
        x = torch.randn(*shape, generator=g, device=device).to(dtype)
    out_shape = (*shape[:-2], m, shape[-1])
    _poison([(out_shape, dtype)], device)
    means, counts = impl(x, m)
    ref, ref_counts = python_ref.segment_means(x.float(), m)
    rel = _rel_err(means, ref)
    ok, reason = True, ""
    if torch.isnan(means).any():
        ok, reason = False, "NaN in means"
    elif tuple(means.shape) != out_shape or means.dtype != dtype:
        ok, reason = False, f"shape/dtype {tuple(means.shape)} {means.dtype}"
    elif not (counts.dtype == torch.int64 and counts.device == x.device
              and torch.equal(counts.cpu(), ref_counts.cpu())):
        ok, reason = False, "counts differ"
    elif not rel <= REL_TOL[dtype]:
        ok, reason = False, f"rel err {rel:.2e} > {REL_TOL[dtype]:.0e}"
    return dict(kind="segment_means", case=f"{tuple(shape)} m={m}{' T' if transposed else ''}",
                dtype=DTYPE_NAME[dtype], rel_err=rel, lse_err=0.0, ok=ok, reason=reason)


# prism::matched_rows (no Triton kernel: the PyTorch composite runs on CUDA):
# (B, n, Hkv, d, m)
MATCHED_CASES = [(1, 99, 12, 64, 10), (2, 129, 6, 64, 13), (3, 40, 2, 80, 1), (1, 17, 4, 64, 20)]


def check_matched_case(case, dtype, device, seed):
    """prism::matched_rows on `device` against python_ref (fp64 loops) on the same rounded
    inputs; m > n leaves some segments empty (zero rows, bias -inf)."""
    B, n, Hkv, d, m = case
    g = _gen(seed, device)
    k = torch.randn(B, n, Hkv * d, generator=g, device=device).mul(2).to(dtype)
    v = torch.randn(B, n, Hkv * d, generator=g, device=device).to(dtype)
    q0 = torch.randn(B, Hkv, d, generator=g, device=device) + 0.5
    seg = torch.randint(0, m, (B, n), generator=g, device=device)
    km, vm, b = torch.ops.prism.matched_rows(q0, k, v, seg, m, d ** -0.5)
    rk, rv, rb = python_ref.matched_rows(q0.cpu(), k.cpu(), v.cpu(), seg.cpu(), m, d ** -0.5)
    empty = torch.isinf(rb)
    rel = max(_rel_err(km.cpu(), rk), _rel_err(vm.cpu(), rv))
    berr = float((b.cpu()[~empty].double() - rb[~empty].double()).abs().max()) if (~empty).any() else 0.0
    ok, reason = True, ""
    if torch.isnan(km).any() or torch.isnan(vm).any():
        ok, reason = False, "NaN in rows"
    elif km.dtype != dtype or b.dtype != torch.float32 or tuple(km.shape) != (B, m, Hkv * d):
        ok, reason = False, f"shape/dtype {tuple(km.shape)} {km.dtype} {b.dtype}"
    elif not torch.equal(torch.isinf(b.cpu()), empty):
        ok, reason = False, "bias -inf not exactly on the empty segments"
    elif not rel <= REL_TOL[dtype]:
        ok, reason = False, f"rel err {rel:.2e} > {REL_TOL[dtype]:.0e}"
    elif not berr <= 1e-3:
        ok, reason = False, f"bias err {berr:.2e} > 1e-3"
    return dict(kind="matched_rows", case=f"B={B} n={n} Hkv={Hkv} d={d} m={m}", dtype=DTYPE_NAME[dtype],
                rel_err=rel, lse_err=berr, ok=ok, reason=reason)


def run_checks(device, dtypes, attn_cases, seg_cases, attn_impl=None, seg_impl=None,
               seed=None, log=print, matched_cases=()):
    """Check the kernels (or the given impls) on every case and dtype; returns rows."""
    if attn_impl is None or seg_impl is None:
        from prism_kernels.triton_kernels import attention_triton, segment_means_triton
        attn_impl = attn_impl or attention_triton
        seg_impl = seg_impl or segment_means_triton
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    log(f"check seed {seed}")
    rows = []
    for dt in dtypes:
        for j, case in enumerate(attn_cases):
            only = [f[5:] for f in case[6] if f.startswith("only:")]
            if only and DTYPE_NAME[dt] not in only:
                continue
            r = check_attention_case(attn_impl, case, dt, device, seed + j)
            rows.append(r)
            log(_fmt_check(r))
        for j, case in enumerate(seg_cases):
            r = check_segment_case(seg_impl, case, dt, device, seed + 1000 + j)
            rows.append(r)
            log(_fmt_check(r))
        for j, case in enumerate(matched_cases):
            r = check_matched_case(case, dt, device, seed + 2000 + j)
            rows.append(r)
            log(_fmt_check(r))
    return rows


def _fmt_check(r):
    status = "PASS" if r["ok"] else f"FAIL ({r['reason']})"
    return (f"  {r['kind']:<13} {r['case']:<28} {r['dtype']:<4} rel {r['rel_err']:.2e} "
            f"lse {r['lse_err']:.2e}  {status}")


# ---------------------------------------------------------------- compile only

# (dtype, d, causal, counts, BLOCK_M, BLOCK_N, num_warps, num_stages)
COMPILE_VARIANTS = [
    ("bf16", 128, True, True, 128, 64, 8, 3), ("bf16", 64, False, True, 128, 128, 8, 3),
    ("fp16", 80, False, False, 64, 64, 4, 3), ("fp32", 128, True, True, 64, 32, 4, 2),
    ("bf16", 256, True, True, 64, 32, 4, 2),
]


def compile_only(variants=COMPILE_VARIANTS, arch=90, log=print):
    """Compile the kernels down to a cubin for sm_<arch> without a GPU (nothing runs).

    Catches what the interpreter cannot: Triton front-end / MLIR / ptxas errors on the
    real compile path. Needs TRITON_INTERPRET unset. Returns a list of (variant, error).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from prism_kernels.triton_kernels.attention import _attn_fwd_kernel
    from prism_kernels.triton_kernels.segment_means import _segment_means_kernel

    target = GPUTarget("cuda", arch, 32)

    def signature(fn, ptrs, constexprs):
        return {a: ("constexpr" if a in constexprs else ptrs.get(a, "fp32" if a == "qk_scale" else "i32"))
                for a in fn.arg_names}

    failures = []
    for var in variants:
        dt, d, causal, counts, bm, bn, warps, stages = var
        block_d = max(16, triton.next_power_of_2(d))
        ce = dict(HAS_COUNTS=counts, CAUSAL=causal, DOT_PREC="ieee" if dt == "fp32" else "tf32",
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=(block_d == d))
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, Out="*" + dt, Lse="*fp32", LC="*fp32",
                    KIDX="*i32" if causal else "*fp32", NVIS="*i32" if causal else "*fp32")
        t = time.time()
        try:
            triton.compile(ASTSource(_attn_fwd_kernel, signature(_attn_fwd_kernel, ptrs, ce), constexprs=ce),
                           target=target, options=dict(num_warps=warps, num_stages=stages))
            log(f"  compiled attention {var} for sm_{arch} in {time.time() - t:.1f} s")
        except Exception as e:  # noqa: BLE001 - reported
            failures.append((var, f"{type(e).__name__}: {e}"))
            log(f"  FAILED attention {var}: {type(e).__name__}: {str(e)[:500]}")
    from prism_kernels.triton_kernels.attention_decode import _decode_merge_kernel, _decode_split_kernel
    for dt, d, causal, counts in (("bf16", 64, True, True), ("fp16", 128, False, True),
                                  ("fp32", 64, True, False)):
        block_d = max(16, triton.next_power_of_2(d))
        ce = dict(HAS_COUNTS=counts, CAUSAL=causal, DOT_PREC="ieee" if dt == "fp32" else "tf32",
                  BLOCK_M=16, BLOCK_N=64, BLOCK_D=block_d)
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, LC="*fp32",
                    QP="*i64" if causal else "*fp32", KP="*i64" if causal else "*fp32",
                    Opart="*fp32", Lpart="*fp32")
        ce_m = dict(BLOCK_M=16, BLOCK_D=block_d, BLOCK_S=64)
        ptrs_m = dict(Opart="*fp32", Lpart="*fp32", Out="*" + dt, Lse="*fp32")
        var = ("decode", dt, d, causal, counts)
        try:
            triton.compile(ASTSource(_decode_split_kernel, signature(_decode_split_kernel, ptrs, ce),
                                     constexprs=ce), target=target, options=dict(num_warps=4, num_stages=2))
            triton.compile(ASTSource(_decode_merge_kernel, signature(_decode_merge_kernel, ptrs_m, ce_m),
                                     constexprs=ce_m), target=target, options=dict(num_warps=4))
            log(f"  compiled decode split-K + merge {var} for sm_{arch}")
        except Exception as e:  # noqa: BLE001 - reported
            failures.append((var, f"{type(e).__name__}: {e}"))
            log(f"  FAILED decode {var}: {type(e).__name__}: {str(e)[:500]}")
    for split in (1, 8):
        ce = dict(SPLIT=split, BLOCK_R=32, BLOCK_D=256)
        ptrs = dict(X="*bf16", Out="*bf16", Ws="*fp32")
        try:
            triton.compile(ASTSource(_segment_means_kernel, signature(_segment_means_kernel, ptrs, ce),
                                     constexprs=ce), target=target, options=dict(num_warps=8))
            log(f"  compiled segment_means SPLIT={split} for sm_{arch}")
        except Exception as e:  # noqa: BLE001 - reported
            failures.append((("segment_means", split), f"{type(e).__name__}: {e}"))
            log(f"  FAILED segment_means SPLIT={split}: {type(e).__name__}: {str(e)[:500]}")
    return failures



"""Scaling-aware attention forward in Triton (docs/method.md, "Scaling-aware attention"
and "Causal mask"; paper Eq. 12-15, 17).

    out = softmax(q k^T * scale + log c) v,   key j visible to query i iff k_pos[j] <= q_pos[i]

One program computes one BLOCK_M block of query rows of one (batch, head) and walks
over the keys in BLOCK_N blocks with the online softmax (FlashAttention-2 style),
in exp2 form: scores are multiplied by scale * log2(e) and the per-key bias is
log(c) * log2(e), so the inner loop uses exp2 only. Accumulation is fp32 whatever
the input dtype; the output is normalised once at the end.

Causal masking follows global positions, which are NOT sorted (a device's keys are
its own rows followed by means of earlier partitions). Attention does not depend on
the order of the key/value rows (Eq. 5), so the wrapper sorts the key *indices* by
position (a tiny int32 [Nk] permutation; K and V are not copied, the kernel reads
them through it) and counts, per query, how many sorted keys it sees (nvis). A query
block then has three ranges of key blocks, with no branch inside any loop:
  * [0, min nvis): visible to every row of the block -> no mask at all;
  * [min nvis, max nvis): the elementwise mask column < nvis[row];
  * [max nvis, Nk): visible to no row of the block -> never loaded, no dot, no exp.
A query row that sees no key keeps m = -inf and l = 0: its output is written as
exact zeros and its lse as -inf (no NaN ever reaches the output).

Non-causal: full key blocks run unmasked, the partial last block masked.
Grouped-query heads: query head h reads kv head h // (H // Hkv); no K/V copy.
Few queries over a long key list (decode steps) go to the split-K kernels of
attention_decode.py instead (attention_triton decides, via decode_chunk).
All tensors are addressed through their strides (HF passes transposed views).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .attention_decode import attention_decode, decode_chunk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = 1.4426950408889634

# Under the interpreter: one small fixed config (every program-iteration costs
# milliseconds on the CPU). tl.dot needs every block dim >= 16.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)


def _bucket(n: int) -> int:
    """Autotune key bucket: the next power of two (at most 32k, at least 64)."""
    return min(max(triton.next_power_of_2(int(n)), 64), 32768)


def _hopper_configs():
    # FlashAttention-2-style tiles for sm_90 (wgmma wants BLOCK_M a multiple of 64 per
    # warp group). Kept short: every config is one compile per kernel variant.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                 (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2)]]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit shared memory / registers for this head dim and dtype."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    fp32 = kwargs.get("DOT_PREC", named_args.get("DOT_PREC")) == "ieee"
    nq = named_args.get("Nq", 1 << 30)
    keep = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        small = bm * bn <= 64 * 64 and st <= 2
        if (block_d >= 256 or (fp32 and block_d >= 128)) != small:
            continue  # wide rows: only the small tile; otherwise not the small tile
        if block_d == 128 and bm * bn > 128 * 64 and c.num_warps < 8:
            continue
        if nq <= 64 and bm > 64:  # tiny query sets: more programs beat bigger tiles
            continue
        keep.append(c)
    return keep or [configs[-1]]


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_base, v_base, lc_base, kidx_base, nvis,
                lo, hi, stride_kn, stride_vn, stride_lcn, qk_scale, offs_n0, d_valid,
                HAS_COUNTS: tl.constexpr, PERMUTED: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi), in exp2 units.

    MASKED: columns >= hi are out (partial last block); CAUSAL_MASK: key column n is
    visible to query row r iff n < nvis[r] (keys sorted by position). Masked columns
    are never loaded, so keys no query of the block sees are never read.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < hi
        if PERMUTED:  # sorted-by-position key order -> row of K / V
            if MASKED:
                rows = tl.load(kidx_base + offs_n, mask=col_ok, other=0).to(tl.int64)
            else:
                rows = tl.load(kidx_base + offs_n).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        k_ptrs = k_base + rows[:, None] * stride_kn
        v_ptrs = v_base + rows[:, None] * stride_vn
        if MASKED:
            k = tl.load(k_ptrs, mask=col_ok[:, None] & d_valid[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_COUNTS:  # + log(c) * log2(e)   (counts already in sorted order)
            if MASKED:
                bias = tl.load(lc_base + offs_n * stride_lcn, mask=col_ok, other=float("-inf"))
            else:
                bias = tl.load(lc_base + offs_n * stride_lcn)
            qk = qk * qk_scale + (bias * LOG2E)[None, :]
        else:
            qk = qk * qk_scale
        if CAUSAL_MASK:
            qk = tl.where(offs_n[None, :] < nvis[:, None], qk, float("-inf"))
        elif MASKED:
            if not HAS_COUNTS:
                qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # a row with nothing visible so far keeps m = -inf: shift by 0 instead (no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_valid[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H", "GROUP", "Nq", "Nk", "D_HEAD", "NQ_KEY", "NK_KEY"])
def _attn_fwd_kernel(
    Q, K, V, LC, KIDX, NVIS, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lcb, stride_lcn,
    stride_ib,
    stride_nvb, stride_nvm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, GROUP, Nq, Nk, D_HEAD, qk_scale,
    NQ_KEY, NK_KEY,  # autotune key buckets only
    HAS_COUNTS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Nq
    d_valid = offs_d < D_HEAD

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + offs_d[None, :] * stride_vd
    lc_base = LC + off_b * stride_lcb
    kidx_base = KIDX + off_b * stride_ib

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # keys are visited in position order; query row r sees the first nvis[r] of them
        nvis = tl.load(NVIS + off_b * stride_nvb + offs_m * stride_nvm, mask=m_valid, other=0)
        hi = tl.max(nvis, axis=0)                                   # beyond: no row sees it
        lo = tl.min(tl.where(m_valid, nvis, Nk), axis=0)            # below: every row sees it
        full_end = (lo // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_base, v_base, lc_base, kidx_base, nvis, 0, full_end,
            stride_kn, stride_vn, stride_lcn, qk_scale, offs_n0, d_valid,
            HAS_COUNTS, True, False, False, EVEN_D, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_base, v_base, lc_base, kidx_base, nvis, full_end, hi,
            stride_kn, stride_vn, stride_lcn, qk_scale, offs_n0, d_valid,
            HAS_COUNTS, True, True, True, EVEN_D, DOT_PREC, BLOCK_N)
    else:
        n_full = (Nk // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_base, v_base, lc_base, kidx_base, l_i, 0, n_full,
            stride_kn, stride_vn, stride_lcn, qk_scale, offs_n0, d_valid,
            HAS_COUNTS, False, False, False, EVEN_D, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_base, v_base, lc_base, kidx_base, l_i, n_full, Nk,
            stride_kn, stride_vn, stride_lcn, qk_scale, offs_n0, d_valid,
            HAS_COUNTS, False, True, False, EVEN_D, DOT_PREC, BLOCK_N)

    LN2: tl.constexpr = 0.6931471805599453
    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_div)) * LN2, float("-inf"))

    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=m_valid)


if INTERPRET:
    _attn_fwd = _attn_fwd_kernel
else:
    _attn_fwd = triton.autotune(
        configs=_hopper_configs(),
        key=["NQ_KEY", "NK_KEY", "BLOCK_D", "CAUSAL", "HAS_COUNTS", "DOT_PREC"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attn_fwd_kernel)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

# When set (see `fixed_config`), CUDA launches use this config instead of autotuning.
_FIXED_CONFIG = None


@contextlib.contextmanager
def fixed_config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2):
    """Launch with one fixed config instead of autotuning (CUDA only; the
    interpreter always uses INTERPRET_CONFIG). Saves compile time when checking
    many shapes and dtypes, e.g. in benchmarks/gpu_check.py."""
    global _FIXED_CONFIG
    prev = _FIXED_CONFIG
    _FIXED_CONFIG = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages)
    try:
        yield
    finally:
        _FIXED_CONFIG = prev


def _causal_order(q_pos, k_pos, log_counts):
    """Visit keys in position order (attention is invariant to permuting key/value
    rows together, Eq. 5), so that each query row sees a prefix of them.

    Returns kidx int32 [B or 1, Nk] (the K/V row of each sorted key; read by the kernel
    as an indirection, K/V are never copied), nvis int32 [B, Nq] (how many sorted
    keys each query sees: #{j : k_pos[j] <= q_pos[i]}) and log_counts in sorted order.
    Stride-0 batch expansions (the usual case) are sorted once, not B times.
    """
    B, Nk = k_pos.shape
    shared = k_pos.stride(0) == 0 or B == 1
    kp = k_pos[:1] if shared else k_pos
    sorted_kp, order = torch.sort(kp, dim=1, stable=True)
    if shared:
        nvis = torch.searchsorted(sorted_kp[0], q_pos.contiguous(), right=True)
    else:
        nvis = torch.searchsorted(sorted_kp.contiguous(), q_pos.contiguous(), right=True)
    if log_counts is not None:
        if shared and log_counts.stride(0) == 0:
            log_counts = log_counts[:1].gather(1, order).expand(B, Nk)
        else:
            log_counts = log_counts.gather(1, order.expand(B, Nk))
    return order.to(torch.int32).contiguous(), nvis.to(torch.int32), log_counts


def attention_triton(q, k, v, log_counts=None, q_pos=None, k_pos=None, scale=None):
    """Kernel form of prism::attention: returns (out [B,H,Nq,d] in q's dtype, lse [B,H,Nq] fp32).

    q: [B, H, Nq, d]; k, v: [B, Hkv, Nk, d] (any strides); log_counts: fp32 [B, Nk]
    or None; q_pos [B, Nq] / k_pos [B, Nk] int64 (both or neither; both = causal).
    lse is the natural-log log-sum-exp, -inf on rows with no visible key (output 0).
    """
    if q.dtype not in _SUPPORTED:
        raise ValueError(
            f"the Triton attention kernel supports float32, float16 and bfloat16, got {q.dtype}; "
            f"use backend='cpp' or 'torch' for float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: [B, H, Nq, d] and [B, Hkv, Nk, d]")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, Hkv, Nk, d) or tuple(v.shape) != (B, Hkv, Nk, d):
        raise ValueError(f"k and v must be [B, Hkv, Nk, d] = [{B}, Hkv, Nk, {d}], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"H ({H}) must be a multiple of Hkv ({Hkv})")
    if d > 256:
        raise ValueError(f"the Triton attention kernel supports head dims up to 256, got {d}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("give both q_pos and k_pos (causal) or neither")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    causal = q_pos is not None
    has_counts = log_counts is not None
    dev = q.device

    out = torch.empty((B, H, Nq, d), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=dev)

    if has_counts:
        lc = log_counts if log_counts.dtype == torch.float32 else log_counts.float()
        if lc.dim() == 1:
            lc = lc.unsqueeze(0).expand(B, Nk)
        if tuple(lc.shape) != (B, Nk):
            raise ValueError(f"log_counts must be [B, Nk] = [{B}, {Nk}], got {tuple(lc.shape)}")
        lc_strides = (lc.stride(0), lc.stride(1))
    else:
        lc, lc_strides = lse, (0, 0)  # dummy pointer, never read
    if causal:
        qp, kp = q_pos, k_pos
        if qp.dim() == 1:
            qp = qp.unsqueeze(0).expand(B, Nq)
        if kp.dim() == 1:
            kp = kp.unsqueeze(0).expand(B, Nk)
        if tuple(qp.shape) != (B, Nq) or tuple(kp.shape) != (B, Nk):
            raise ValueError(f"q_pos must be [B, Nq] and k_pos [B, Nk], got "
                             f"{tuple(qp.shape)} and {tuple(kp.shape)}")

    # Few queries over a long key list (decode steps): the split-K kernels of
    # attention_decode.py. decode_chunk is the one place that decides.
    chunk = decode_chunk(B, H, Hkv, Nq, Nk, d, dev)
    if chunk:
        return attention_decode(q, k, v, lc if has_counts else None,
                                qp if causal else None, kp if causal else None,
                                float(scale) * _LOG2E, chunk, out, lse)

    if causal:
        kidx, nvis, lc_sorted = _causal_order(qp, kp, lc if has_counts else None)
        if has_counts:
            lc = lc_sorted
            lc_strides = (lc.stride(0), lc.stride(1))
        kidx_stride = kidx.stride(0) if kidx.shape[0] > 1 else 0
        nvis_strides = (nvis.stride(0), nvis.stride(1))
    else:
        kidx, nvis = lse, lse  # dummies, never read
        kidx_stride, nvis_strides = 0, (0, 0)

    block_d = max(16, triton.next_power_of_2(d))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (
        q, k, v, lc, kidx, nvis, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        *lc_strides, kidx_stride, *nvis_strides,
        *out.stride(), *lse.stride(),
        H, H // Hkv, Nq, Nk, d, float(scale) * _LOG2E,
        _bucket(Nq), _bucket(Nk),
    )
    meta = dict(HAS_COUNTS=has_counts, CAUSAL=causal, DOT_PREC=dot_prec,
                BLOCK_D=block_d, EVEN_D=(block_d == d))
    if INTERPRET:
        grid = (triton.cdiv(Nq, INTERPRET_CONFIG["BLOCK_M"]), B * H)
        _attn_fwd[grid](*args, **meta, **INTERPRET_CONFIG)
    elif _FIXED_CONFIG is not None:
        cfg = dict(_FIXED_CONFIG)
        if block_d >= 256 or (block_d >= 128 and q.dtype == torch.float32):
            cfg.update(BLOCK_M=64, BLOCK_N=32, num_stages=2)  # shared-memory bound
        grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
        with torch.cuda.device(dev):
            _attn_fwd_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)  # noqa: E731
        with torch.cuda.device(dev):
            _attn_fwd[grid](*args, **meta)
    return out, lse

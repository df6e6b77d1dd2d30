"""Scaling-aware attention forward in Triton (SPEC sec. 6-7; paper Eq. 12-15, 17).

    out = softmax(q k^T * scale + log c) v,   key j visible to query i iff k_pos[j] <= q_pos[i]

One program computes one BLOCK_M block of query rows of one (batch, head) and walks
over the keys in BLOCK_N blocks with the online softmax (FlashAttention-2 style),
in exp2 form: scores are multiplied by scale * log2(e) and the per-key bias is
log(c) * log2(e), so the inner loop uses exp2 only. Accumulation is fp32 whatever
the input dtype; the output is normalised once at the end.

Causal masking follows global positions, which are NOT sorted (a device's keys are
its own rows followed by means of earlier partitions). Each key block therefore
loads its positions and
  * is skipped entirely when min(k_pos) > max(q_pos of the query block)
    (no dot products, no exp);
  * runs without the 2-D mask when max(k_pos) <= min(q_pos) (fully visible);
  * applies the elementwise mask only when it straddles the query block.
A query row that sees no key keeps m = -inf and l = 0: its output is written as
exact zeros and its lse as -inf (no NaN ever reaches the output).

Grouped-query heads: query head h reads kv head h // (H // Hkv); no K/V copy.
All tensors are addressed through their strides (HF passes transposed views).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Under the interpreter: one small fixed config (every program-iteration costs
# milliseconds on the CPU). tl.dot needs every block dim >= 16.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)


def _bucket(n: int) -> int:
    """Autotune key bucket: the next power of two (at most 32k, at least 64)."""
    return min(max(triton.next_power_of_2(int(n)), 64), 32768)


def _hopper_configs():
    cfgs = []
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
        (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 32, 4, 2),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit shared memory / registers for wide heads."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    nq = named_args.get("Nq", 1 << 30)
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_d >= 256 and (bm * bn > 64 * 64 or c.num_stages > 2):
            continue
        if block_d == 128 and bm * bn > 128 * 64 and c.num_warps < 8:
            continue
        if nq <= 64 and bm > 64:  # tiny query sets: more programs beat bigger tiles
            continue
        keep.append(c)
    return keep or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, LC, QP, KP, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lcb, stride_lcn,
    stride_qpb, stride_qpm,
    stride_kpb, stride_kpn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, GROUP, Nq, Nk, D_HEAD, qk_scale,
    NQ_KEY, NK_KEY,  # autotune key buckets only
    HAS_COUNTS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
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
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + offs_d[None, :] * stride_vd

    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    if CAUSAL:
        qp_ptrs = QP + off_b * stride_qpb + offs_m * stride_qpm
        if EVEN_M:
            qpos = tl.load(qp_ptrs)
            q_max = tl.max(qpos, axis=0)
            q_min = tl.min(qpos, axis=0)
        else:
            qpos = tl.load(qp_ptrs, mask=m_valid, other=0)
            q_max = tl.max(tl.where(m_valid, qpos, -9223372036854775807), axis=0)
            q_min = tl.min(tl.where(m_valid, qpos, 9223372036854775807), axis=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < Nk
        run = True
        partial = False
        if CAUSAL:
            kp_ptrs = KP + off_b * stride_kpb + offs_n * stride_kpn
            if EVEN_N:
                kpos = tl.load(kp_ptrs)
                k_min = tl.min(kpos, axis=0)
                k_max = tl.max(kpos, axis=0)
            else:
                kpos = tl.load(kp_ptrs, mask=n_valid, other=9223372036854775807)
                k_min = tl.min(kpos, axis=0)
                k_max = tl.max(tl.where(n_valid, kpos, -9223372036854775807), axis=0)
            run = k_min <= q_max      # some key of the block is visible to some query
            partial = k_max > q_min   # some (query, key) pair of the block is masked
        if run:
            k_ptrs = k_base + offs_n[:, None] * stride_kn
            v_ptrs = v_base + offs_n[:, None] * stride_vn
            if EVEN_N and EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            # bias in log2 units: log(c) * log2(e); -inf on keys past Nk
            if HAS_COUNTS:
                lc_ptrs = LC + off_b * stride_lcb + offs_n * stride_lcn
                if EVEN_N:
                    bias = tl.load(lc_ptrs) * LOG2E
                else:
                    bias = tl.load(lc_ptrs, mask=n_valid, other=float("-inf")) * LOG2E
                qk = qk * qk_scale + bias[None, :]
            else:
                qk = qk * qk_scale
                if not EVEN_N:
                    qk = tl.where(n_valid[None, :], qk, float("-inf"))
            if CAUSAL:
                if partial:
                    qk = tl.where(kpos[None, :] <= qpos[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # rows with nothing visible so far keep m = -inf: shift by 0 instead (no NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if EVEN_N and EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_div)) * LN2, float("-inf"))

    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    l_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    if EVEN_M:
        tl.store(l_ptrs, lse)
    else:
        tl.store(l_ptrs, lse, mask=m_valid)


_heuristics = triton.heuristics({
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Nk"] % a["BLOCK_N"] == 0,
})

if INTERPRET:
    _attn_fwd = _heuristics(_attn_fwd_kernel)
else:
    _attn_fwd = triton.autotune(
        configs=_hopper_configs(),
        key=["NQ_KEY", "NK_KEY", "BLOCK_D", "CAUSAL", "HAS_COUNTS", "DOT_PREC"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_heuristics(_attn_fwd_kernel))

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def attention_triton(q, k, v, log_counts=None, q_pos=None, k_pos=None, scale=None):
    """Kernel form of prism::attention: returns (out [B,H,Nq,d] in q's dtype, lse [B,H,Nq] fp32).

    q: [B, H, Nq, d]; k, v: [B, Hkv, Nk, d] (any strides); log_counts: fp32 [B, Nk]
    or None; q_pos [B, Nq] / k_pos [B, Nk] int64 (both or neither; both = causal).
    lse is the natural-log log-sum-exp, -inf on rows with no visible key (output 0).
    """
    if q.dtype not in _SUPPORTED:
        raise ValueError(
            f"the Triton attention kernel supports float32, float16 and bfloat16, got {q.dtype}; "
            f"use backend='cpp' or 'reference' for float64")
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
        if qp.dtype != torch.int64:
            qp = qp.to(torch.int64)
        if kp.dtype != torch.int64:
            kp = kp.to(torch.int64)
        if tuple(qp.shape) != (B, Nq) or tuple(kp.shape) != (B, Nk):
            raise ValueError(f"q_pos must be [B, Nq] and k_pos [B, Nk], got "
                             f"{tuple(qp.shape)} and {tuple(kp.shape)}")
        qp_strides, kp_strides = (qp.stride(0), qp.stride(1)), (kp.stride(0), kp.stride(1))
    else:
        qp, kp = lse, lse  # dummies, never read
        qp_strides, kp_strides = (0, 0), (0, 0)

    block_d = max(16, triton.next_power_of_2(d))
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (
        q, k, v, lc, qp, kp, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        *lc_strides, *qp_strides, *kp_strides,
        *out.stride(), *lse.stride(),
        H, H // Hkv, Nq, Nk, d, float(scale) * _LOG2E,
        _bucket(Nq), _bucket(Nk),
    )
    meta = dict(HAS_COUNTS=has_counts, CAUSAL=causal, DOT_PREC=dot_prec,
                BLOCK_D=block_d, EVEN_D=(block_d == d))
    if INTERPRET:
        grid = (triton.cdiv(Nq, INTERPRET_CONFIG["BLOCK_M"]), B * H)
        _attn_fwd[grid](*args, **meta, **INTERPRET_CONFIG)
    else:
        grid = lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)  # noqa: E731
        with torch.cuda.device(dev):
            _attn_fwd[grid](*args, **meta)
    return out, lse

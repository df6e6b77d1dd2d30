"""Scaling-aware attention for few queries over a long key list: split-K
("flash-decoding"). Called by attention_triton (attention.py), which decides
when (`decode_chunk`); same semantics and return values as there.

In a decode step Nq = 1 (up to a few with speculative steps) and B * H is 9-32,
so the general kernel, one program per (query block, batch, head), launches a
few dozen programs for a GPU with 132 SMs, each walking the whole key list, and
pads the one query row to BLOCK_M. Here:
  * one program per (batch, kv head, key chunk): its rows are the GROUP * Nq
    query rows that read that kv head (row r = query head r // Nq, query
    r % Nq), so each K/V tile is loaded once per group and fills more of the
    tl.dot tile than one query row would;
  * the chunks make B * Hkv * splits programs, enough to fill the GPU;
  * each program writes its chunk's normalised output and base-2 lse to a small
    fp32 scratch buffer; a second kernel merges the splits of a row by
    log-sum-exp (M = max_s lse_s, w_s = 2^(lse_s - M), out = sum_s w_s out_s /
    sum_s w_s, lse = M + log2(sum_s w_s)), which is exact algebra, not an
    approximation.
Causal masking reads the positions directly (key visible iff k_pos <= q_pos); no
sort, the keys of a chunk are few. Rows with no visible key: zeros, lse = -inf.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_NQ = 16          # more query rows: the general kernel has enough programs
MAX_ROWS = 64        # GROUP * Nq rows in one program (BLOCK_M)
MAX_D = 128          # wider heads: the general kernel (shared memory)
MIN_NK = 512         # shorter key lists: one pass of the general kernel is as good
MIN_CHUNK = 256      # keys per program at least: amortises the partial write / merge

# Counters and overrides for tests and A/B timing (`decode_split`).
CALLS = {"split": 0}
_FORCE: dict = {"enabled": True, "chunk": None}


@contextlib.contextmanager
def decode_split(enabled: bool = True, chunk: int | None = None):
    """Within this block: enabled=False never takes the split-K path (the general
    kernel, for A/B timing); chunk=n takes it for every shape it supports, with n
    keys per program (tests force small chunks so the merge is exercised)."""
    prev = dict(_FORCE)
    _FORCE.update(enabled=enabled, chunk=chunk)
    try:
        yield
    finally:
        _FORCE.clear()
        _FORCE.update(prev)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def decode_chunk(B, H, Hkv, Nq, Nk, d, device) -> int:
    """Keys per program for the split-K path, or 0 when the general kernel runs.
    The one place the Triton backend decides."""
    if not _FORCE["enabled"]:
        return 0
    rows = (H // Hkv) * Nq
    if Nq > MAX_NQ or rows > MAX_ROWS or d > MAX_D or Nk == 0 or Nq == 0 or B == 0:
        return 0
    if _FORCE["chunk"] is not None:
        return max(1, int(_FORCE["chunk"]))
    if Nk < MIN_NK:
        return 0
    # about two programs per SM, no chunk shorter than MIN_CHUNK keys; a multiple
    # of 64 (the key block) so that only the last chunk has a partial block
    splits = triton.cdiv(2 * _num_sms(device), B * Hkv)
    chunk = max(MIN_CHUNK, triton.cdiv(Nk, splits))
    return triton.cdiv(chunk, 64) * 64


@triton.jit(do_not_specialize=["Hkv", "GROUP", "Nq", "Nk", "D_HEAD", "CHUNK", "SPLITS"])
def _decode_split_kernel(
    Q, K, V, LC, QP, KP, Opart, Lpart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lcb, stride_lcn,
    stride_qpb, stride_qpm,
    stride_kpb, stride_kpn,
    Hkv, GROUP, Nq, Nk, D_HEAD, CHUNK, SPLITS, qk_scale,
    HAS_COUNTS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_bh = tl.program_id(0)            # b * Hkv + kv head
    pid_s = tl.program_id(1)             # key chunk
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hk = (pid_bh % Hkv).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_valid = offs_m < GROUP * Nq
    d_valid = offs_d < D_HEAD
    qi = offs_m % Nq                                   # query index of row r
    qh = off_hk * GROUP + offs_m // Nq                 # query head of row r

    q = tl.load(Q + off_b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if CAUSAL:
        qpos = tl.load(QP + off_b * stride_qpb + qi * stride_qpm, mask=m_valid, other=0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hk * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, Nk)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < hi
        kv_mask = col_ok[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_COUNTS:  # + log(c) * log2(e): the log-count bias, part of the logit
            bias = tl.load(LC + off_b * stride_lcb + offs_n * stride_lcn, mask=col_ok, other=0.0)
            qk = qk + (bias * LOG2E)[None, :]
        visible = col_ok[None, :]
        if CAUSAL:
            kpos = tl.load(KP + off_b * stride_kpb + offs_n * stride_kpn, mask=col_ok, other=0)
            visible = visible & (kpos[None, :] <= qpos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing visible yet: no NaN
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    # this chunk's normalised output and base-2 lse (-inf: the row saw no key here)
    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    out = acc / l_div[:, None]
    lse2 = tl.where(has_key, m_i + tl.math.log2(l_div), float("-inf"))
    rows = (pid_bh.to(tl.int64) * SPLITS + pid_s) * BLOCK_M + offs_m
    tl.store(Opart + rows[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(Lpart + rows, lse2)


@triton.jit(do_not_specialize=["H", "Hkv", "GROUP", "Nq", "D_HEAD", "SPLITS"])
def _decode_merge_kernel(
    Opart, Lpart, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, Hkv, GROUP, Nq, D_HEAD, SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)               # (b * H + h) * Nq + i
    i = pid % Nq
    h = (pid // Nq) % H
    b = pid // (Nq * H)
    hk = h // GROUP
    r = (h % GROUP) * Nq + i              # the row of this query in its split program
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    rows = ((b * Hkv + hk).to(tl.int64) * SPLITS + offs_s) * BLOCK_M + r
    lse2 = tl.load(Lpart + rows, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_safe)                  # 0 for splits that saw nothing
    total = tl.sum(w, axis=0)
    o = tl.load(Opart + rows[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    has_key = total > 0.0
    out = tl.sum(o * w[:, None], axis=0) / tl.where(has_key, total, 1.0)
    lse = tl.where(has_key, (m_safe + tl.math.log2(tl.where(has_key, total, 1.0))) * LN2,
                   float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < D_HEAD)
    tl.store(Lse + b * stride_lb + h * stride_lh + i * stride_lm, lse)


def attention_decode(q, k, v, lc, qp, kp, scale_log2, chunk, out, lse):
    """Run the split-K path with `chunk` keys per program into out / lse.

    lc: fp32 [B, Nk] or None; qp / kp: int64 [B, Nq] / [B, Nk] or None (causal);
    scale_log2 = scale * log2(e). Arguments already checked by attention_triton.
    """
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    splits = triton.cdiv(Nk, chunk)
    block_m = max(16, triton.next_power_of_2(group * Nq))    # tl.dot needs >= 16
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 16 if INTERPRET else 64
    dev = q.device
    opart = torch.empty((B * Hkv, splits, block_m, block_d), dtype=torch.float32, device=dev)
    lpart = torch.empty((B * Hkv, splits, block_m), dtype=torch.float32, device=dev)
    has_counts, causal = lc is not None, qp is not None
    dummy = lpart
    lc_ = lc if has_counts else dummy
    qp_, kp_ = (qp, kp) if causal else (dummy, dummy)
    lc_str = (lc.stride(0), lc.stride(1)) if has_counts else (0, 0)
    qp_str = (qp.stride(0), qp.stride(1)) if causal else (0, 0)
    kp_str = (kp.stride(0), kp.stride(1)) if causal else (0, 0)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    CALLS["split"] += 1
    warps = {} if INTERPRET else dict(num_warps=4, num_stages=2)
    ctx = contextlib.nullcontext() if dev.type != "cuda" else torch.cuda.device(dev)
    with ctx:
        _decode_split_kernel[(B * Hkv, splits)](
            q, k, v, lc_, qp_, kp_, opart, lpart,
            *q.stride(), *k.stride(), *v.stride(), *lc_str, *qp_str, *kp_str,
            Hkv, group, Nq, Nk, d, chunk, splits, float(scale_log2),
            HAS_COUNTS=has_counts, CAUSAL=causal, DOT_PREC=dot_prec,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **warps)
        _decode_merge_kernel[(B * H * Nq,)](
            opart, lpart, out, lse, *out.stride(), *lse.stride(),
            H, Hkv, group, Nq, d, splits,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            **({} if INTERPRET else dict(num_warps=4)))
    return out, lse

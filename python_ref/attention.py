"""Scaling-aware attention (docs/method.md, "Scaling-aware attention" and "Causal mask"; paper Eq. 11-15, 17).

Two forms of the same thing:

* `prism_attention`: softmax(S + log c) V, one key per mean, weighted by the
  number of tokens c it stands for (Eq. 13-15).
* `duplicated_attention`: repeat every key/value row c times (Eq. 11) and run
  plain softmax attention. Slow and obviously correct; the fused kernels are
  checked against it.

Both honour grouped-query heads (H a multiple of Hkv) and the partition-aware
causal rule (Eq. 17): key k is visible to query a iff k_pos[k] <= q_pos[a].
A query with no visible key gets zeros (and lse = -inf).
"""
from __future__ import annotations

import math

import torch


def normalize_attention_args(q, k, v, key_counts=None, causal=False, q_pos=None, k_pos=None,
                             scale=None):
    """User-facing arguments -> (log-counts [B, Nk], q_pos [B, Nq], k_pos [B, Nk], scale).

    The oracle's own minimal version: it assumes valid arguments (the argument
    checks with their error messages are prism_kernels.checks). Counts and
    positions may be [N] or [B, N]; positions default to arange when causal.
    """
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_counts = None
    if key_counts is not None:
        log_counts = key_counts.to(acc).log().expand(B, Nk)
    if causal:
        q_pos = (torch.arange(Nq, device=q.device) if q_pos is None else q_pos).to(torch.int64)
        k_pos = (torch.arange(Nk, device=q.device) if k_pos is None else k_pos).to(torch.int64)
        q_pos, k_pos = q_pos.expand(B, Nq), k_pos.expand(B, Nk)
    else:
        q_pos = k_pos = None
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return log_counts, q_pos, k_pos, float(scale)


def _expand_kv_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, Hkv, N, d] -> [B, H, N, d]: query head h reads kv head h // (H / Hkv)."""
    return t.repeat_interleave(H // t.shape[1], dim=1)


def _masked_softmax_attention(q, k, v, bias, q_pos, k_pos, scale, return_lse):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    H = q.shape[1]
    qf, kf, vf = q.to(acc), _expand_kv_heads(k, H).to(acc), _expand_kv_heads(v, H).to(acc)
    scores = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale          # S
    if bias is not None:                                               # + log c
        scores = scores + bias.to(acc)[:, None, None, :]
    if q_pos is not None:                                              # Eq. 17
        visible = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                              # [B, H, Nq]
    # Rows with no visible key have lse = -inf; give them zero weights, not NaN.
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
    weights = torch.nan_to_num(weights, nan=0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, vf).to(q.dtype)
    return (out, lse.to(torch.float32 if acc == torch.float32 else acc)) if return_lse else out


def prism_attention(q, k, v, *, key_counts=None, causal=False, q_pos=None, k_pos=None,
                    scale=None, return_lse=False):
    """softmax(q k^T * scale + log(key_counts)) v, masked by global positions."""
    log_counts, q_pos, k_pos, scale = normalize_attention_args(
        q, k, v, key_counts, causal, q_pos, k_pos, scale)
    return _masked_softmax_attention(q, k, v, log_counts, q_pos, k_pos, scale, return_lse)


def duplicated_attention(q, k, v, key_counts, *, causal=False, q_pos=None, k_pos=None,
                         scale=None):
    """Eq. 11: repeat each key/value row key_counts times, then plain attention.

    key_counts must hold whole numbers. Positions are repeated with their rows.
    """
    log_counts, q_pos, k_pos, scale = normalize_attention_args(
        q, k, v, key_counts, causal, q_pos, k_pos, scale)
    B = q.shape[0]
    if log_counts is None:
        counts = torch.ones(B, k.shape[2], dtype=torch.int64, device=q.device)
    else:
        c = log_counts.exp().round()
        counts = c.to(torch.int64)
        if not torch.allclose(c, log_counts.exp(), rtol=1e-6, atol=1e-6):
            raise ValueError("duplicated_attention needs whole-number key_counts")
    outs = []
    for b in range(B):  # counts may differ per batch row, so the lengths differ
        rep = counts[b]
        kb = k[b:b + 1].repeat_interleave(rep, dim=2)
        vb = v[b:b + 1].repeat_interleave(rep, dim=2)
        kp = k_pos[b:b + 1].repeat_interleave(rep, dim=1) if k_pos is not None else None
        qp = q_pos[b:b + 1] if q_pos is not None else None
        outs.append(_masked_softmax_attention(q[b:b + 1], kb, vb, None, qp, kp, scale, False))
    return torch.cat(outs, dim=0)

"""The "prism_distributed" attention function and the overlap of communication
with computation.

Inside a block, the model's own attention module computes the local q, k, v
[B, H, n_i, d] (rotary applied at global positions for Llama / Qwen2) and calls
the function registered here under transformers' AttentionInterface. It

1. starts the exchange of this layer's means if it has not started yet
   (attention_input averaging: means of K/V here; means of the attention input
   start earlier, from a pre-hook on the attention module, before the Q/K/V
   projections; the block_input averaging and Voltage start theirs before the
   block, from the block input),
2. attends to the local keys while the means are in flight (causal by global
   position in decoder models),
3. waits for the received rows, turns them into keys/values (pre-norm and K/V
   projections of the block, or nothing when K/V means came on the wire),
4. attends to them with the scaling-aware softmax (log-count bias, docs/method.md
   "Scaling-aware attention") and
5. merges the two partial results by their log-sum-exp:
       lse = logaddexp(l1, l2),  out = o1 exp(l1 - lse) + o2 exp(l2 - lse).

With overlap off, it waits first and runs one prism_attention call over
[local keys ; received keys]; the tests check both give the same output.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

import prism_kernels as pk
from prism_kernels.hf.spread_bias import extra_score_dim

ATTN_NAME = "prism_distributed"

_local = threading.local()


def current():
    return getattr(_local, "ctx", None)


class use_layer:
    """Context manager: the layer context the attention function reads."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        _local.ctx = self.ctx
        return self.ctx

    def __exit__(self, *exc):
        _local.ctx = None
        return False


def merge_by_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor):
    """Merge two attention outputs over disjoint key sets ([B,H,n,d], lse [B,H,n]).
    The first part's weight exp(l1 - lse) is sigmoid(l1 - l2): one interpolation, no
    per-part exponentials (this runs in every layer of the runtime)."""
    lse = torch.logaddexp(l1, l2)
    acc = torch.float64 if o1.dtype == torch.float64 else torch.float32
    # NaN only where both are -inf (no visible key at all): weight 0, and o2 is zero there
    w1 = torch.sigmoid((l1 - l2).to(acc)).nan_to_num_(0.0).unsqueeze(-1)
    out = torch.lerp(o2.to(acc), o1.to(acc), w1)
    return out.to(o1.dtype), lse


def prism_distributed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                **kwargs):
    ctx = current()
    if ctx is None:
        raise RuntimeError("prism_distributed attention called outside the distributed runtime")
    if ctx.exchange_in_attention and ctx.pending is None:     # not started by the pre-hook
        ctx.start_attention_exchange(key, value, query, scaling)
    causal = ctx.causal
    q_pos = ctx.q_pos if causal else None
    d = query.shape[-1]
    s = scaling if scaling is not None else d ** -0.5
    if ctx.overlap:
        o1, l1 = pk.prism_attention(query, key, value, causal=causal, q_pos=q_pos, k_pos=q_pos,
                                    scale=scaling, return_lse=True)
        remote = ctx.receive_kv(query.dtype)
        if remote is None:
            out = o1
        else:
            kr, vr, cr, pr, br = remote
            q2 = query
            if br is not None:      # matched rows: their bias as one more score dimension
                q2, kr, vr = extra_score_dim(query, kr, vr, query.new_ones(query.shape[:-1]), br / s)
            # received means come from earlier partitions only in causal mode: all visible
            o2, l2 = pk.prism_attention(q2, kr, vr, key_counts=cr, scale=s, return_lse=True)
            out, _ = merge_by_lse(o1, l1, o2[..., :d], l2)
    else:
        remote = ctx.receive_kv(query.dtype)
        if remote is None:
            out = pk.prism_attention(query, key, value, causal=causal, q_pos=q_pos, k_pos=q_pos,
                                     scale=scaling)
        else:
            kr, vr, cr, pr, br = remote
            # counts: the plan's [R], or [B, R] per sequence with data-dependent segments
            ones = torch.ones(cr.shape[:-1] + (key.shape[2],), dtype=torch.int64)
            q2, k2, v2 = query, torch.cat([key, kr], 2), torch.cat([value, vr], 2)
            if br is not None:      # matched rows' bias; 0 for the own keys
                k_col = torch.cat([br.new_zeros(br.shape[:-1] + (key.shape[2],)), br / s], -1)
                q2, k2, v2 = extra_score_dim(query, k2, v2, query.new_ones(query.shape[:-1]), k_col)
            out = pk.prism_attention(q2, k2, v2, key_counts=torch.cat([ones, cr], -1), causal=causal,
                                     q_pos=q_pos, k_pos=torch.cat([q_pos, pr]) if causal else None,
                                     scale=s)[..., :d]
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register():
    """Register the attention function (and a mask function, without which
    transformers refuses the name) under ATTN_NAME. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, prism_distributed_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    _registered = True

"""The "torch" backend: the ops written with plain PyTorch tensor ops.

It is the fallback that keeps the `prism` ops usable where no fast kernel is
available (a CPU install without the compiled extension, a CUDA machine
without Triton) and what backend="torch" selects explicitly. It runs on every
device and every float dtype, accumulating in fp32 (fp64 for fp64 inputs).

The functions take the kernel form of the arguments (prism_kernels/ops.py)
and return fresh contiguous tensors, like the C++ and Triton kernels.
"""
from __future__ import annotations

import torch

_CHUNK = 1024  # query rows per step: memory B * H * chunk * Nk accumulator floats


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_means(x: torch.Tensor, num_segments: int):
    """(means [..., m, D] in x's dtype, counts int64 [m]); tensor_split segment sizes."""
    n = x.shape[-2]
    m = int(num_segments)
    # the first n mod m segments hold one more token (torch.tensor_split sizes)
    counts = torch.full((m,), n // m, dtype=torch.int64, device=x.device)
    counts[: n % m] += 1
    seg = torch.repeat_interleave(torch.arange(m, device=x.device), counts, output_size=n)
    acc = acc_dtype(x.dtype)
    sums = torch.zeros(*x.shape[:-2], m, x.shape[-1], dtype=acc, device=x.device)
    sums.index_add_(-2, seg, x.to(acc))
    means = (sums / counts.to(acc).unsqueeze(-1)).to(x.dtype)
    return means, counts


def attention(q, k, v, log_counts, q_pos, k_pos, scale):
    """(out [B, H, Nq, d] in q's dtype, lse [B, H, Nq] fp32 / fp64).

    softmax(q k^T * scale + log_counts) v, key j visible to query i iff
    k_pos[j] <= q_pos[i] when positions are given; rows with no visible key
    get zeros and lse = -inf.
    """
    acc = acc_dtype(q.dtype)
    B, H, Nq, d = q.shape
    g = H // k.shape[1]
    kf = k.to(acc).repeat_interleave(g, dim=1)   # query head h reads kv head h // g
    vf = v.to(acc).repeat_interleave(g, dim=1)
    bias = log_counts.to(acc)[:, None, None, :] if log_counts is not None else None
    out = torch.empty(B, H, Nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=acc, device=q.device)
    for s in range(0, Nq, _CHUNK):
        e = min(Nq, s + _CHUNK)
        scores = torch.matmul(q[:, :, s:e].to(acc), kf.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        if q_pos is not None:
            visible = k_pos[:, None, None, :] <= q_pos[:, None, s:e, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        lse_c = torch.logsumexp(scores, dim=-1)
        # rows with no visible key: lse = -inf; shift by a finite value so they get 0, not NaN
        p = torch.exp(scores - lse_c.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
        out[:, :, s:e] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, s:e] = lse_c
    return out, lse


def _segment_weights(z: torch.Tensor, seg_of: torch.Tensor, m: int, shared: bool):
    """z [B, n, Hkv] (the scores at q0) -> the softmax within each segment w [B, n, Hkv],
    the segment indicator [B, m, n] and each segment's log-sum-exp [B, m, Hkv]."""
    B, n, Hkv = z.shape
    if m == 1:      # one segment (a partition sent as one row): a plain softmax over its tokens
        top = z.amax(1, keepdim=True)
        e = torch.exp(z - top)
        tot = e.sum(1, keepdim=True)
        w = e / tot
        if shared:
            w = w.mean(2, keepdim=True).expand(B, n, Hkv)
        return w, z.new_ones(B, 1, n), tot.log() + top
    idx = seg_of[..., None].expand(B, n, Hkv)
    top = z.new_full((B, m, Hkv), float("-inf")).scatter_reduce(1, idx, z, "amax")
    e = torch.exp(z - top.gather(1, idx))
    # sums over each segment's tokens as one batched matmul with the segment indicator
    # [B, m, n]: several times faster than scatter_add over [n, Hkv, d] on a CPU
    member = z.new_zeros(B, m, n).scatter_(1, seg_of[:, None, :], 1.0)
    tot = torch.bmm(member, e)                                         # [B, m, Hkv]
    w = e / tot.gather(1, idx)
    if shared:
        w = w.mean(2, keepdim=True).expand(B, n, Hkv)
    return w, member, tot.log() + top


def matched_rows(q0, k, v, seg_of, num_segments, scale, shared: bool = False):
    """(k~, v~ [B, m, Hkv*d] in k's dtype, bias [B, m, Hkv] fp32 / fp64): each segment of
    seg_of [B, n] summarised at the query q0 [B, Hkv, d] (python_ref/matched_rows.py).
    Differentiable (the simulation fine-tunes through it). shared: one weight per token
    for all KV heads (an experiment; not part of the op)."""
    B, n, F = k.shape
    m = int(num_segments)
    Hkv, d = q0.shape[1], q0.shape[2]
    acc = acc_dtype(k.dtype)
    q0 = q0.to(acc)
    k4 = k.to(acc).view(B, n, Hkv, d)
    z = scale * torch.einsum("bnhd,bhd->bnh", k4, q0)                  # [B, n, Hkv]
    w, member, lse = _segment_weights(z, seg_of, m, shared)
    seg_sum = lambda t: torch.bmm(member, (t * w[..., None]).reshape(B, n, F)).view(B, m, Hkv, d)
    km = seg_sum(k4)
    vm = seg_sum(v.to(acc).view(B, n, Hkv, d))
    bias = lse - scale * torch.einsum("bmhd,bhd->bmh", km, q0)
    return km.reshape(B, m, F).to(k.dtype), vm.reshape(B, m, F).to(k.dtype), bias

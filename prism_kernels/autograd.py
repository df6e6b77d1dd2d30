"""Backward of the prism ops, registered with torch.library.register_autograd.

Registered on the ops themselves, so it applies whichever backend ran the
forward (cpp, triton, torch). The attention forward kernels save nothing but their output and the
log-sum-exp; the backward recomputes the probabilities from them, flash-style:

  P   = exp(S + log c - lse)            (0 where masked)
  dV  = P^T dO                          (summed over the query heads of a group)
  dS  = P * (dO V^T - rowsum(dO * O) + g_lse)
  dQ  = scale * dS K,   dK = scale * dS^T Q,   d(log c) = sum_{h, a} dS

It is plain PyTorch (so it runs on every device and under torch.compile),
processed in query chunks to keep the [.., chunk, Nk] intermediates bounded.
"""
from __future__ import annotations

import torch

_CHUNK = 1024  # query rows per step: bounds memory at B*H*chunk*Nk floats


def _setup_context(ctx, inputs, output):
    q, k, v, log_counts, q_pos, k_pos, scale = inputs[:7]   # (then the backend name)
    out, lse = output
    ctx.save_for_backward(q, k, v, log_counts, q_pos, k_pos, out, lse)
    ctx.scale = scale
    ctx.has_counts = log_counts is not None
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, log_counts, q_pos, k_pos, out, lse = ctx.saved_tensors
    scale = ctx.scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = H // Hkv
    kf = k.to(acc).repeat_interleave(g, dim=1)
    vf = v.to(acc).repeat_interleave(g, dim=1)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq = torch.empty(B, H, Nq, d, dtype=acc, device=q.device)
    dk = torch.zeros(B, H, Nk, d, dtype=acc, device=q.device)
    dv = torch.zeros(B, H, Nk, d, dtype=acc, device=q.device)
    dbias = torch.zeros(B, Nk, dtype=acc, device=q.device) if ctx.has_counts else None
    for s in range(0, Nq, _CHUNK):
        e = min(Nq, s + _CHUNK)
        qc = q[:, :, s:e].to(acc)
        scores = torch.einsum("bhqd,bhkd->bhqk", qc, kf) * scale
        if log_counts is not None:
            scores = scores + log_counts.to(acc)[:, None, None, :]
        if q_pos is not None:
            visible = k_pos[:, None, None, :] <= q_pos[:, None, s:e, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        lse_c = lse[:, :, s:e].to(acc).unsqueeze(-1)
        p = torch.exp(scores - lse_c.clamp_min(torch.finfo(acc).min))   # masked -> 0
        do = grad_out[:, :, s:e].to(acc)
        dv += torch.einsum("bhqk,bhqd->bhkd", p, do)
        dp = torch.einsum("bhqd,bhkd->bhqk", do, vf)
        delta = (do * out[:, :, s:e].to(acc)).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, :, s:e].to(acc).unsqueeze(-1)
        ds = p * (dp - delta)
        dq[:, :, s:e] = torch.einsum("bhqk,bhkd->bhqd", ds, kf) * scale
        dk += torch.einsum("bhqk,bhqd->bhkd", ds, qc) * scale
        if dbias is not None:
            dbias += ds.sum(dim=(1, 2))
    dk = dk.view(B, Hkv, g, Nk, d).sum(2)
    dv = dv.view(B, Hkv, g, Nk, d).sum(2)
    if dbias is not None:
        dbias = dbias.to(log_counts.dtype)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None)
    return grads + (None,) * (ctx.num_inputs - len(grads))


torch.library.register_autograd("prism::attention", _backward, setup_context=_setup_context)


# segment_means is linear: every token of segment s receives grad_means[s] / c_s.
def _means_setup_context(ctx, inputs, output):
    x = inputs[0]
    _, counts = output
    ctx.save_for_backward(counts)
    ctx.x_dtype = x.dtype
    ctx.n = x.shape[-2]
    ctx.num_inputs = len(inputs)


def _means_backward(ctx, grad_means, grad_counts):
    (counts,) = ctx.saved_tensors
    nones = (None,) * (ctx.num_inputs - 1)
    if grad_means is None:
        return (None,) + nones
    acc = torch.float64 if grad_means.dtype == torch.float64 else torch.float32
    scaled = grad_means.to(acc) / counts.to(acc).unsqueeze(-1)
    return (scaled.repeat_interleave(counts, dim=-2, output_size=ctx.n).to(ctx.x_dtype),) + nones


torch.library.register_autograd("prism::segment_means", _means_backward,
                                setup_context=_means_setup_context)

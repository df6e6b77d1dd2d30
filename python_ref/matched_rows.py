"""Rows matched at a query (docs/method.md, "Rows matched at a query").

A segment S of tokens stands in a receiver's softmax for its log-sum-exp
L(q) = log sum_{t in S} exp(s q.k_t) and its output. Matched at one query q0, the
segment is sent as one row:

    w_t = exp(s q0.k_t) / sum_{u in S} exp(s q0.k_u)      (softmax within S)
    k~  = sum_t w_t k_t,   v~ = sum_t w_t v_t,   b = L(q0) - s q0.k~

so that s q.k~ + b equals L(q) and its gradient at q = q0. With q0 = 0 this is the
paper's row: the mean key and value, and b = log |S|.
"""
from __future__ import annotations

import torch


def matched_rows(q0: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_of: torch.Tensor,
                 num_segments: int, scale: float):
    """q0 [B, Hkv, d] (the query per KV head), k / v [B, n, Hkv*d], seg_of [B, n] in
    0..m-1 -> (k~, v~ [B, m, Hkv*d] in k's dtype, b [B, m, Hkv] in fp32 / fp64).
    One segment at a time, one KV head at a time, in fp64; a segment with no
    token gives zero rows and b = -inf."""
    B, n, F = k.shape
    Hkv, d = q0.shape[1], q0.shape[2]
    m = int(num_segments)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    km = torch.zeros(B, m, Hkv, d, dtype=torch.float64)
    vm = torch.zeros(B, m, Hkv, d, dtype=torch.float64)
    bias = torch.full((B, m, Hkv), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            q = q0[b, h].double()
            kh = k[b].double().view(n, Hkv, d)[:, h]
            vh = v[b].double().view(n, Hkv, d)[:, h]
            for j in range(m):
                tok = (seg_of[b] == j).nonzero().flatten()
                if len(tok) == 0:
                    continue
                z = scale * (kh[tok] @ q)
                w = torch.softmax(z, 0)
                km[b, j, h] = w @ kh[tok]
                vm[b, j, h] = w @ vh[tok]
                bias[b, j, h] = torch.logsumexp(z, 0) - scale * (km[b, j, h] @ q)
    return km.view(B, m, F).to(k.dtype), vm.view(B, m, F).to(k.dtype), bias.to(acc)

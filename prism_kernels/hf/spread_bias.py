"""An experimental count bias corrected for the spread of the keys in a segment
(PrismConfig.count_bias="spread"; simulation only).

The scaling-aware softmax gives a segment of c tokens the weight c * exp(s q.k_mean),
but the tokens it stands for would have had sum_t exp(s q.k_t), which is larger
(Jensen) by the factor E_t[exp(s q.(k_t - k_mean))]. For keys spread isotropically
with variance sigma^2 per dimension around their mean that factor is
exp(s^2 |q|^2 sigma^2 / 2) (the Gaussian moment generating function). The term is
a product of a per-query and a per-key number, so it folds into the scores as one
extra head dimension: q' = [q, |q|^2], k' = [k_mean, s sigma^2 / 2] (0 for a token
sent alone), v' = [v, 0], keeping the kernel unchanged.

docs/accuracy.md reports what it does to accuracy.
"""
from __future__ import annotations

import torch

from ..plan import partition_means


def segment_key_spread(keys: torch.Tensor, group, part, heads: int, backend: str) -> torch.Tensor:
    """Per segment and KV head, the mean over dimensions of the keys' variance around
    the segment mean: [Bg * m_j, heads] (keys: [B, N, heads * d])."""
    k = group.take(keys, part).float()
    mean, _ = partition_means(k, part, backend=backend)
    second, _ = partition_means(k * k, part, backend=backend)
    var = (second - mean * mean).clamp_min(0)
    return var.view(var.shape[0], var.shape[1], heads, -1).mean(-1).reshape(-1, heads)


def extra_score_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_col: torch.Tensor, k_col: torch.Tensor):
    """q [R, H, nq, d], k / v [R, Hkv, nk, d] -> q', k', v' with one more head dimension:
    q_col [R, H, nq] on the queries, k_col [R, Hkv, nk] on the keys, 0 on the values, so
    every score gains q_col * k_col (times the kernel's scale) and the output is unchanged
    in its first d dimensions. Shared by the experimental biases (this one, matched_summary)."""
    q2 = torch.cat([q, q_col.unsqueeze(-1).to(q.dtype)], -1)
    k2 = torch.cat([k, k_col.unsqueeze(-1).to(k.dtype)], -1)
    v2 = torch.cat([v, v.new_zeros(v.shape[:-1] + (1,))], -1)
    return q2, k2, v2


def augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_extra: torch.Tensor, scale: float):
    """q [R, H, nq, d], k / v [R, Hkv, nk, d], key_extra [R, Hkv, nk] (s sigma^2 / 2)
    -> q', k', v' with one more dimension (|q|^2 on the queries)."""
    return extra_score_dim(q, k, v, (q.float() ** 2).sum(-1), key_extra)

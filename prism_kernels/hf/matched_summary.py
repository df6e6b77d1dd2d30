"""An experimental segment summary matched at the sender's mean query
(PrismConfig.count_bias="matched" / "matched_half" / "matched_shared"; simulation
only, data-dependent segments only).

A segment S of c tokens stands in a receiver's softmax for its log-sum-exp
L(q) = log sum_{t in S} exp(s q.k_t) and its output sum_t softmax_S(q)_t v_t. The
paper's row (mean key k_mean with the bias log c, mean value v_mean) is the first-order
match of both at q = 0: L(0) = log c, grad L(0) = s k_mean, output v_mean. Queries
are not centred at 0, so this matches them at q0 = gamma * (the mean query of the
sending partition, per KV head) instead:

  w_t = softmax_S(s q0.k_t),  k~ = sum w_t k_t,  v~ = sum w_t v_t,
  b = L(q0) - s q0.k~          (the row's bias, in place of log c)

so that s q.k~ + b equals L(q) and its gradient at q0, and v~ the output there.
gamma = 0 gives back the paper's row; a token sent alone keeps its own key and value
with bias 0. "matched_shared" averages the weights w_t over the KV heads, so that one
row of the attention input per segment would still do on the wire (plus the biases). The bias folds into the scores as one extra head dimension: q' = [q, 1],
k' = [k~, b / s] (0 for the receiver's own tokens), v' = [v, 0], the rows' counts
set to 1, so the kernels stay unchanged. What crosses the network would be one float
per row and KV head in place of the count.

docs/accuracy.md reports what it does to accuracy.
"""
from __future__ import annotations

import torch

from .spread_bias import extra_score_dim

# count_bias -> (gamma: the scale of the mean query the rows are matched at,
#                shared: one weight per token for all KV heads)
MATCHED = {"matched": (1.0, False), "matched_half": (0.5, False), "matched_shared": (1.0, True)}


def matched_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_of: torch.Tensor,
                    counts: torch.Tensor, heads: int, scale: float, gamma: float, shared: bool = False):
    """One partition's rows. q [Bg, n, heads * d] (its queries), k / v [Bg, n, Hkv * d],
    seg_of [Bg, n] in 0..m-1, counts [Bg, m]. Returns (k~, v~) [Bg, m, Hkv * d] in
    k's / v's dtype and the bias b [Bg, m, Hkv], computed in fp32 (fp64 for fp64 inputs)."""
    Bg, n, F = k.shape
    m = counts.shape[1]
    d = q.shape[-1] // heads
    Hkv = F // d
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    q0 = q.to(acc).view(Bg, n, heads, d).mean(1).view(Bg, Hkv, heads // Hkv, d).mean(2) * gamma
    k4, v4 = k.to(acc).view(Bg, n, Hkv, d), v.to(acc).view(Bg, n, Hkv, d)
    z = scale * torch.einsum("bnhd,bhd->bnh", k4, q0)                  # [Bg, n, Hkv]
    idx = seg_of[..., None].expand(Bg, n, Hkv)
    top = z.new_full((Bg, m, Hkv), float("-inf")).scatter_reduce(1, idx, z, "amax")
    e = torch.exp(z - top.gather(1, idx))
    tot = z.new_zeros(Bg, m, Hkv).scatter_add(1, idx, e)
    w = (e / tot.gather(1, idx))[..., None]                            # softmax within each segment
    if shared:
        w = w.mean(2, keepdim=True).expand(Bg, n, Hkv, 1)
    i4 = seg_of[..., None, None].expand(Bg, n, Hkv, d)
    km = k4.new_zeros(Bg, m, Hkv, d).scatter_add(1, i4, k4 * w)
    vm = v4.new_zeros(Bg, m, Hkv, d).scatter_add(1, i4, v4 * w)
    bias = tot.log() + top - scale * torch.einsum("bmhd,bhd->bmh", km, q0)
    return km.reshape(Bg, m, F).to(k.dtype), vm.reshape(Bg, m, F).to(v.dtype), bias


def augment_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor):
    """q [R, H, nq, d], k / v [R, Hkv, nk, d], key_bias [R, Hkv, nk] (b / s) -> q', k',
    v' with one more dimension (1 on the queries), so that the scores gain b."""
    return extra_score_dim(q, k, v, q.new_ones(q.shape[:-1]), key_bias)

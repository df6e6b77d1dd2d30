"""A segment summary matched at a query (PrismConfig.count_bias= "matched" /
"matched_half" / "matched_shared" at the sender's mean query, "matched_cls" at the
[CLS] query; "auto" picks "matched" for text encoders and "matched_cls" for vision
encoders; data-dependent segments only; the simulation and the runtime call the same code).

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
with bias 0. "matched_cls" matches every partition's rows at one query, that of the
sequence's first token ([CLS] in BERT and ViT), instead of the sending partition's
mean: on DINOv2 the mean query is mostly that of background patches, and the [CLS]
query serves every receiver better (docs/accuracy.md). "matched_shared" averages the weights w_t over the KV heads. The bias
folds into the scores as one extra head dimension: q' = [q, 1], k' = [k~, b / s] (0 for
the receiver's own tokens), v' = [v, 0], the rows' counts set to 1, so the kernels stay
unchanged. On the network a row is its key, its value and one bias per KV head, no count
(costs.comm.wire_format "matched").

docs/accuracy.md reports what it does to accuracy.
"""
from __future__ import annotations

import torch

from .. import torch_backend
from .spread_bias import extra_score_dim

# count_bias -> (gamma: the scale of the mean query the rows are matched at,
#                shared: one weight per token for all KV heads)
# ("matched_cls" is matched at the query of the sequence's first token instead of the mean
# query: the callers pass that one query, costs.comm.MATCHED_AT_FIRST_TOKEN)
MATCHED = {"matched": (1.0, False), "matched_half": (0.5, False), "matched_shared": (1.0, True),
           "matched_cls": (1.0, False)}


def _mean_query(q: torch.Tensor, heads: int, Hkv: int, gamma: float) -> torch.Tensor:
    """gamma x the mean of q [Bg, nq, heads * d] over tokens and each KV head's query heads."""
    Bg, d = q.shape[0], q.shape[-1] // heads
    return q.view(Bg, -1, heads, d).mean(1).view(Bg, Hkv, heads // Hkv, d).mean(2) * gamma


def matched_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_of: torch.Tensor,
                    counts: torch.Tensor, heads: int, scale: float, gamma: float, shared: bool = False):
    """One partition's rows. q [Bg, nq, heads * d] (its queries; only their mean is used,
    so the mean query alone, nq = 1, will do), k / v [Bg, n, Hkv * d], seg_of [Bg, n] in
    0..m-1, counts [Bg, m]. Returns (k~, v~) [Bg, m, Hkv * d] in k's
    dtype and the bias b [Bg, m, Hkv], computed in fp32 (fp64 for fp64 inputs)."""
    Bg, n, F = k.shape
    m = counts.shape[1]
    d = q.shape[-1] // heads
    Hkv = F // d
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    q0 = _mean_query(q.to(acc), heads, Hkv, gamma)                      # [Bg, Hkv, d]
    if shared or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # differentiated (fine-tuning through the simulation) or the shared-weights
        # experiment: the composite in plain torch ops
        return torch_backend.matched_rows(q0, k, v, seg_of, m, scale, shared)
    # the prism op: one pass over k and v (the C++ kernel on CPU)
    return torch.ops.prism.matched_rows(q0, k, v, seg_of, m, float(scale))


def augment_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor):
    """q [R, H, nq, d], k / v [R, Hkv, nk, d], key_bias [R, Hkv, nk] (b / s) -> q', k',
    v' with one more dimension (1 on the queries), so that the scores gain b."""
    return extra_score_dim(q, k, v, q.new_ones(q.shape[:-1]), key_bias)

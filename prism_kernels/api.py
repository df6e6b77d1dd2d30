"""Public functions: argument checks, then the `prism` op, whatever the backend.

Every call goes through torch.ops.prism.segment_means / torch.ops.prism.attention,
so autograd (prism_kernels/autograd.py) and torch.compile work the same for
every backend. The backend is chosen by `backend=` for one call, or by
`use_backend(...)` for a block of code; prism_kernels/ops.py dispatches on it.
"""
from __future__ import annotations

import torch

from .checks import check_segment_means_args, normalize_attention_args
from .ops import BACKENDS, check_backend_name, selected_backend, use_backend

__all__ = ["segment_means", "prism_attention", "use_backend", "selected_backend", "BACKENDS"]

# the op overloads, looked up once (torch.ops.prism.attention would resolve the
# overload on every call)
_attention_op = torch.ops.prism.attention.default
_segment_means_op = torch.ops.prism.segment_means.default


def segment_means(x: torch.Tensor, num_segments: int, *, backend: str | None = None):
    """Means of `num_segments` contiguous segments of x along dim -2 (Alg. 2).

    x: [..., n, D] float. Returns (means [..., m, D] in x's dtype, counts int64 [m]);
    segment sizes follow torch.tensor_split (the first n mod m are one longer).
    backend: one of BACKENDS for this call; None (default) uses the one selected
    by use_backend() ("auto" outside any).
    """
    check_segment_means_args(x, num_segments)
    if backend is None:
        return _segment_means_op(x, int(num_segments))
    return _segment_means_op(x, int(num_segments), check_backend_name(backend))


def prism_attention(q, k, v, *, key_counts=None, causal=False, q_pos=None, k_pos=None,
                    scale=None, backend: str | None = None, return_lse: bool = False):
    """Scaling-aware attention softmax(q k^T * scale + log c) v (Eq. 13-15).

    q: [B, H, Nq, d]; k, v: [B, Hkv, Nk, d], H % Hkv == 0. key_counts: [Nk] or
    [B, Nk], each >= 1 (None: all 1). causal: key j visible to query i iff
    k_pos[j] <= q_pos[i] (global positions, Eq. 17); positions default to
    arange when Nq == Nk. A query with no visible key returns zeros.
    backend: one of BACKENDS for this call; None (default) uses the one selected
    by use_backend() ("auto" outside any).
    Returns [B, H, Nq, d] in q's dtype, and with return_lse=True also the
    log-sum-exp [B, H, Nq] (fp32; fp64 for fp64 inputs) so partial results can
    be merged. Differentiable with respect to q, k, v and float key_counts.
    """
    log_counts, q_pos, k_pos, scale = normalize_attention_args(
        q, k, v, key_counts, causal, q_pos, k_pos, scale)
    if backend is None:
        out, lse = _attention_op(q, k, v, log_counts, q_pos, k_pos, scale)
    else:
        out, lse = _attention_op(q, k, v, log_counts, q_pos, k_pos, scale, check_backend_name(backend))
    return (out, lse) if return_lse else out

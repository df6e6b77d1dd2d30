"""Public functions (SPEC sec. 11): checks, then one dispatch to a backend."""
from __future__ import annotations

import os

import torch

import python_ref
from python_ref.checks import check_segment_means_args, normalize_attention_args

from . import _cpp
from . import ops

BACKENDS = ("auto", "cpp", "triton", "reference")


def _check_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got tensors on {device}")
        if not _cpp.load():
            raise RuntimeError(
                "backend='cpp' needs the C++ extension, which is not built; "
                "run `pip install --no-build-isolation -e .` (or use backend='auto')")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import; "
            "use CUDA tensors or another backend")
    return backend


def segment_means(x: torch.Tensor, num_segments: int, *, backend: str = "auto"):
    """Means of `num_segments` contiguous segments of x along dim -2 (Alg. 2).

    x: [..., n, D] float. Returns (means [..., m, D] in x's dtype, counts int64 [m]);
    segment sizes follow torch.tensor_split (the first n mod m are one longer).
    """
    check_segment_means_args(x, num_segments)
    backend = _check_backend(backend, x.device)
    if backend == "reference":
        return python_ref.segment_means(x, num_segments)
    if backend == "triton":
        from .triton_kernels import segment_means_triton
        return segment_means_triton(x, num_segments)
    return torch.ops.prism.segment_means(x, int(num_segments))


def prism_attention(q, k, v, *, key_counts=None, causal=False, q_pos=None, k_pos=None,
                    scale=None, backend: str = "auto", return_lse: bool = False):
    """Scaling-aware attention softmax(q k^T * scale + log c) v (Eq. 13-15).

    q: [B, H, Nq, d]; k, v: [B, Hkv, Nk, d], H % Hkv == 0. key_counts: [Nk] or
    [B, Nk], each >= 1 (None: all 1). causal: key j visible to query i iff
    k_pos[j] <= q_pos[i] (global positions, Eq. 17); positions default to
    arange when Nq == Nk. A query with no visible key returns zeros.
    Returns [B, H, Nq, d] in q's dtype, and with return_lse=True also the
    log-sum-exp [B, H, Nq] (fp32) so partial results can be merged.
    """
    log_counts, q_pos, k_pos, scale = normalize_attention_args(
        q, k, v, key_counts, causal, q_pos, k_pos, scale)
    backend = _check_backend(backend, q.device)
    if backend == "reference":
        out, lse = ops.reference_attention(q, k, v, log_counts, q_pos, k_pos, scale)
    elif backend == "triton":
        from .triton_kernels import attention_triton
        out, lse = attention_triton(q, k, v, log_counts, q_pos, k_pos, scale)
    else:
        out, lse = torch.ops.prism.attention(q, k, v, log_counts, q_pos, k_pos, scale)
    return (out, lse) if return_lse else out

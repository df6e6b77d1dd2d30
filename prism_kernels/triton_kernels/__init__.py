"""Triton GPU kernels of the `prism` ops: the "triton" backend (prism_kernels/ops.py;
"auto" picks it for CUDA tensors). Also runs on CPU tensors under
TRITON_INTERPRET=1, set before this package is imported.

segment_means_triton(x, num_segments) -> (means, counts)
attention_triton(q, k, v, log_counts, q_pos, k_pos, scale) -> (out, lse)
decode_split(enabled=True, chunk=None): context manager forcing / disabling the
    split-K decode path of attention_triton (tests, A/B timing)
"""
from .attention import attention_triton
from .attention_decode import decode_split
from .segment_means import segment_means_triton

__all__ = ["segment_means_triton", "attention_triton", "decode_split"]

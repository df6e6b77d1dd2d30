"""The `prism` torch.library ops: schemas, fake (meta) kernels and backends.

Two ops, in the kernel form of the arguments (see python_ref.checks):

  prism::segment_means(Tensor x, int num_segments) -> (Tensor means, Tensor counts)
  prism::attention(Tensor q, Tensor k, Tensor v, Tensor? log_counts,
                   Tensor? q_pos, Tensor? k_pos, float scale) -> (Tensor out, Tensor lse)

log_counts is fp32 [B, Nk] (often a stride-0 expand over B), positions are
int64 [B, Nq] / [B, Nk] and present only for causal attention, lse is the
natural-log log-sum-exp [B, H, Nq] (fp32; fp64 for fp64 inputs), -inf on rows
with no visible key.

This module is the one place where backends are attached to the ops:
CPU -> the C++ extension (prism_kernels._C) when it is built, else the Python
reference; CUDA -> Triton.
"""
from __future__ import annotations

import torch

import python_ref
from python_ref.attention import _masked_softmax_attention

from . import _cpp

_lib = torch.library.Library("prism", "DEF")
_lib.define("segment_means(Tensor x, int num_segments) -> (Tensor, Tensor)")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? log_counts, Tensor? q_pos, "
    "Tensor? k_pos, float scale) -> (Tensor, Tensor)"
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("prism::segment_means")
def _segment_means_fake(x, num_segments):
    shape = list(x.shape)
    shape[-2] = num_segments
    return x.new_empty(shape), torch.empty(num_segments, dtype=torch.int64, device=x.device)


@torch.library.register_fake("prism::attention")
def _attention_fake(q, k, v, log_counts, q_pos, k_pos, scale):
    B, H, Nq, d = q.shape
    return q.new_empty(B, H, Nq, d), torch.empty(B, H, Nq, dtype=lse_dtype(q.dtype), device=q.device)


def reference_segment_means(x, num_segments):
    return python_ref.segment_means(x, num_segments)


def reference_attention(q, k, v, log_counts, q_pos, k_pos, scale):
    out, lse = _masked_softmax_attention(q, k, v, log_counts, q_pos, k_pos, scale, True)
    return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


# CPU: the C++ kernels register themselves (TORCH_LIBRARY_IMPL(prism, CPU)) when
# the extension loads; without a build (e.g. a GPU box with no compiler step)
# the reference keeps the ops usable.
if not _cpp.load():
    _lib.impl("segment_means", reference_segment_means, "CPU")
    _lib.impl("attention", reference_attention, "CPU")


def _cuda_segment_means(x, num_segments):
    from .triton_kernels import segment_means_triton
    return segment_means_triton(x, num_segments)


def _cuda_attention(q, k, v, log_counts, q_pos, k_pos, scale):
    from .triton_kernels import attention_triton
    return attention_triton(q, k, v, log_counts, q_pos, k_pos, scale)


_lib.impl("segment_means", _cuda_segment_means, "CUDA")
_lib.impl("attention", _cuda_attention, "CUDA")

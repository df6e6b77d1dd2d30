"""prism-kernels: Prism distributed Transformer inference (segment means +
scaling-aware attention) with fast CPU (C++) and GPU (Triton) kernels.

Public API: segment_means, prism_attention, the partition / layout helpers
below, and backend selection (BACKENDS, use_backend, selected_backend; see
prism_kernels/ops.py).
"""
from python_ref.layout import DeviceLayout, PrismPlan, device_keys_values, device_tensors, local_rows, plan_layout
from python_ref.partition import num_means, partition_offsets, partition_sizes, segment_sizes

from . import ops  # registers the torch.library ops
from . import autograd  # registers their backward
from .api import BACKENDS, prism_attention, segment_means, selected_backend, use_backend
from ._cpp import variant as cpp_variant

__version__ = "0.1.0"

__all__ = [
    "partition_sizes", "partition_offsets", "segment_sizes", "num_means",
    "segment_means", "prism_attention", "BACKENDS", "use_backend", "selected_backend",
    "DeviceLayout", "PrismPlan", "plan_layout", "local_rows", "device_keys_values", "device_tensors",
    "cpp_variant",
]

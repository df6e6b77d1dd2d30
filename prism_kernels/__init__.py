"""prism-kernels: Prism distributed Transformer inference (segment means +
scaling-aware attention) with fast CPU (C++) and GPU (Triton) kernels.

Public API: segment_means, prism_attention, the partition / layout helpers
below, and backend selection (BACKENDS, use_backend, selected_backend; see
prism_kernels/ops.py).
"""
from .plan import (DeviceLayout, Partition, PrismPlan, Segment, device_keys_values, device_tensors, local_rows,
                   make_plan, num_means, partition_means, partition_offsets, partition_sizes, plan_layout,
                   proportional_sizes, segment_sizes)
from .config import AVERAGING, PrismConfig

from . import ops  # registers the torch.library ops
from . import autograd  # registers their backward
from .api import BACKENDS, prism_attention, segment_means, selected_backend, use_backend
from ._cpp import variant as cpp_variant

__version__ = "0.1.0"

__all__ = [
    "partition_sizes", "partition_offsets", "segment_sizes", "num_means",
    "segment_means", "prism_attention", "BACKENDS", "use_backend", "selected_backend",
    "DeviceLayout", "PrismPlan", "Partition", "Segment", "make_plan", "plan_layout", "proportional_sizes",
    "partition_means", "PrismConfig", "AVERAGING", "local_rows", "device_keys_values", "device_tensors",
    "cpp_variant",
]

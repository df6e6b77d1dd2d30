"""Pure-PyTorch reference of Prism (docs/method.md in code), readable next to the paper.

It is the test oracle: every kernel in prism_kernels is tested against these
functions. It does not import prism_kernels, so it cannot share their bugs.
"""
from .attention import duplicated_attention, prism_attention
from .layout import (DeviceLayout, PrismPlan, device_keys_values, device_tensors, local_rows, plan_from_segments,
                     plan_layout)
from .partition import num_means, partition_offsets, partition_sizes, segment_sizes, split_sizes
from .matched_rows import matched_rows
from .segment_means import segment_means

__all__ = [
    "partition_sizes", "partition_offsets", "segment_sizes", "split_sizes", "num_means",
    "segment_means", "matched_rows", "prism_attention", "duplicated_attention",
    "DeviceLayout", "PrismPlan", "plan_layout", "plan_from_segments", "local_rows", "device_keys_values", "device_tensors",
]

"""Communication per layer: tokens and bytes each device receives (PDPLC).

Voltage: device i all-gathers every other partition's hidden states, N - n_i rows.
Prism:   device i receives the segment means of every other partition,
         sum_{j != i} m_j rows (the paper's tables count all of them).
         In causal models a device only needs the means of earlier partitions
         (later ones are fully masked), sum_{j < i} m_j: `causal=True` plans.
The repetition counts need not travel: they follow from (n_j, m_j), which every
device knows. Bytes = rows x hidden size x bytes per element.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

DTYPE_BYTES: Dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "fp8": 1}


def received_tokens(plan) -> List[int]:
    """Prism: rows (segment means) device i receives per layer, for a PrismPlan.

    A causal plan (plan_layout(..., causal=True)) lists only earlier partitions'
    means, so this gives the causal runtime's figure; a non-causal plan gives the
    paper's sum_{j != i} m_j.
    """
    return [d.tokens_received for d in plan.devices]


def voltage_received_tokens(sizes: Sequence[int]) -> List[int]:
    """Voltage: rows (full hidden states) device i receives per layer, N - n_i."""
    n = sum(sizes)
    return [n - s for s in sizes]


def bytes_for(tokens: int, hidden_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of `tokens` hidden-state rows of width hidden_size."""
    return int(tokens) * int(hidden_size) * int(dtype_bytes)


def dtype_bytes(dtype) -> int:
    """Bytes per element of 'fp32' / 'fp16' / 'bf16' / ..., a torch.dtype, or an int."""
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)} (or bytes per element), got {dtype!r}")

"""Segment Means (docs/method.md, "Segment means"; paper Alg. 2, Eq. 8-9)."""
from __future__ import annotations

import torch

from .partition import segment_sizes


def segment_means(x: torch.Tensor, num_segments: int):
    """Means of m contiguous segments along dim -2 and their token counts.

    x: [..., n, D]. Returns (means [..., m, D] in x's dtype, counts int64 [m]).
    Accumulates in fp32 (fp64 for fp64 input) so low-precision inputs keep
    their accuracy.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape [..., n, D] (at least 2-D)")
    sizes = segment_sizes(x.shape[-2], num_segments)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = torch.split(x.to(acc), sizes, dim=-2)
    means = torch.stack([p.mean(dim=-2) for p in parts], dim=-2).to(x.dtype)
    counts = torch.tensor(sizes, dtype=torch.int64, device=x.device)
    return means, counts

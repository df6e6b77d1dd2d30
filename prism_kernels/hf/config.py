"""PrismConfig: how a Hugging Face model is simulated under Prism.

* num_partitions (P): simulated devices; the sequence is split into P
  contiguous partitions (SPEC sec. 3).
* exactly one of num_means (m, means per partition, clipped to the partition
  size) or compression_rate (CR >= 1, m_j = ceil(n_j / CR), Eq. 16).
* averaging: what the segment means are taken of (SPEC sec. 8)
    - "attention_input" (default): the keys and values as the model computes
      them (for pre-LN models K/V of LN(X); for Llama the *rotated* keys).
      Because projections are affine this is exactly mean(LN(X)) W_K, i.e.
      the "normalised attention input" variant; for post-LN BERT it is the
      paper's method itself.
    - "block_output": the paper's choice for pre-LN models: the means are taken
      of the block input X (the previous block's output, the residual stream)
      and K/V are computed from LN(mean(X)) -- the means are normalised by the
      block's own pre-attention norm. Needs hooks (prism_kernels.hf.block_output).
* backend: passed to prism_kernels.prism_attention / segment_means.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

AVERAGING = ("attention_input", "block_output")


@dataclass(frozen=True)
class PrismConfig:
    num_partitions: int = 2
    num_means: Optional[int] = None
    compression_rate: Optional[float] = None
    averaging: str = "attention_input"
    backend: str = "auto"

    def __post_init__(self):
        P = self.num_partitions
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            raise ValueError(f"num_partitions must be an integer >= 1, got {P!r}")
        if (self.num_means is None) == (self.compression_rate is None):
            raise ValueError("give exactly one of num_means (means per partition) or compression_rate")
        if self.num_means is not None:
            m = self.num_means
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"num_means must be an integer >= 1, got {m!r}")
        if self.compression_rate is not None:
            cr = self.compression_rate
            if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not math.isfinite(cr) or cr < 1:
                raise ValueError(f"compression_rate must be a finite number >= 1, got {cr!r}")
        if self.averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {self.averaging!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value) -> "PrismConfig":
        if isinstance(value, PrismConfig):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"expected a PrismConfig or a dict of its fields, got {type(value).__name__}")

    def means_for(self, n: int) -> int:
        """m_j for a partition of n tokens."""
        if self.num_means is not None:
            return min(self.num_means, n)
        return min(n, max(1, math.ceil(n / float(self.compression_rate))))

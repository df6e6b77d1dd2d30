"""Partitioning and segment sizes (docs/method.md; paper Alg. 1, Alg. 2, Eq. 16).

Plain Python on ints: these sizes decide which rows each device holds, so they
are kept free of any tensor library and checked with clear messages.
"""
from __future__ import annotations

import math
import numbers
from typing import List


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def split_sizes(n: int, parts: int) -> List[int]:
    """Contiguous split of n items into `parts` groups, larger groups first.

    n_i = floor(n / parts) + (1 if i < n mod parts else 0), exactly the sizes of
    torch.tensor_split(x, parts). Used for partitions (Alg. 1) and for segments
    inside a partition (Alg. 2).
    """
    base, rem = divmod(n, parts)
    return [base + 1 if i < rem else base for i in range(parts)]


def partition_sizes(n_tokens: int, num_partitions: int) -> List[int]:
    """Alg. 1: token count of each of the P contiguous partitions.

    P > N is an error (a device with no tokens has nothing to contribute).
    """
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    num_partitions = _check_int("num_partitions", num_partitions, 1)
    if num_partitions > n_tokens:
        raise ValueError(
            f"num_partitions must be <= n_tokens (every device needs at least one token), "
            f"got num_partitions={num_partitions} > n_tokens={n_tokens}"
        )
    return split_sizes(n_tokens, num_partitions)


def partition_offsets(sizes) -> List[int]:
    """Global offset o_i = n_1 + ... + n_{i-1} of each partition."""
    offsets, acc = [], 0
    for s in sizes:
        offsets.append(acc)
        acc += s
    return offsets


def segment_sizes(n: int, num_segments: int) -> List[int]:
    """Alg. 2 / Eq. 8: sizes of the m segments of a partition of n tokens.

    The first r = n mod m segments hold s + 1 tokens, the rest s = floor(n/m).
    These sizes are the repetition counts c_i (Eq. 9); they sum to n.
    """
    n = _check_int("n", n, 1)
    num_segments = _check_int("num_segments", num_segments, 1)
    if num_segments > n:
        raise ValueError(
            f"num_segments must be <= the number of tokens n (1 <= m <= n), "
            f"got num_segments={num_segments} > n={n}"
        )
    return split_sizes(n, num_segments)


def num_means(n_tokens: int, compression_rate: float) -> int:
    """Eq. 16: m = min(n, max(1, ceil(n / CR))), the means kept for n tokens."""
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    if isinstance(compression_rate, bool) or not isinstance(compression_rate, numbers.Real):
        raise ValueError(
            f"compression_rate must be a real number >= 1, got {compression_rate!r}"
        )
    cr = float(compression_rate)
    if not math.isfinite(cr) or cr < 1.0:
        raise ValueError(f"compression_rate must be a finite number >= 1, got {compression_rate!r}")
    return min(n_tokens, max(1, math.ceil(n_tokens / cr)))

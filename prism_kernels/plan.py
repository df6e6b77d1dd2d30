"""The segment plan: what every device holds, sends and receives.

This module is the one place that decides it (docs/method.md, "Partitions" and
"Segment means"). The one-process simulation (`prism_kernels.hf`), the runtime
(`prism_kernels.distributed`), the cost model (`prism_kernels.costs`), `prism demo`
and `prism eval` all read a `PrismPlan`; none of them splits tokens on its own.

For N tokens on P devices:
  * partition i holds the contiguous tokens offset_i .. offset_i + n_i - 1
    (Alg. 1: an equal split by default; any sizes may be given, e.g. in
    proportion to device speed);
  * it sends a list of segments. A segment covers a set of its tokens (not
    necessarily contiguous), is sent as their mean, and counts as `count` tokens
    in the receiver's softmax (the log-count bias, Eq. 13-15). Its position, for
    the partition-aware causal mask (Eq. 17), is its last token: a query sees the
    mean exactly when it could see every token the mean stands for;
  * by default the segments are the paper's (Alg. 2): m_j = min(n_j, max(1,
    ceil(n_j / CR))) contiguous runs (Eq. 16), the first n_j mod m_j one token longer;
  * device i attends with queries = its own tokens, keys/values = its own tokens
    (count 1) followed by the segments of the partitions it receives from: all
    others, or in causal models only the earlier ones (the later ones would be
    masked for every query anyway, so they are never sent).

Plans are plain Python ints, immutable and cached: building one per layer costs
a dictionary look-up.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

# ------------------------------------------------------------------ sizes


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def split_sizes(n: int, parts: int) -> list:
    """n items in `parts` contiguous groups, the first n mod parts one larger
    (the sizes of torch.tensor_split(x, parts))."""
    base, rem = divmod(n, parts)
    return [base + 1 if i < rem else base for i in range(parts)]


def partition_sizes(n_tokens: int, num_partitions: int) -> list:
    """Alg. 1: tokens of each of the P contiguous partitions (P <= N)."""
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    num_partitions = _check_int("num_partitions", num_partitions, 1)
    if num_partitions > n_tokens:
        raise ValueError(
            f"num_partitions must be <= n_tokens (every device needs at least one token), "
            f"got num_partitions={num_partitions} > n_tokens={n_tokens}")
    return split_sizes(n_tokens, num_partitions)


def proportional_sizes(n_tokens: int, weights: Sequence[float]) -> list:
    """Partition sizes in proportion to `weights` (e.g. device speeds), each >= 1.

    Largest-remainder rounding, so the sizes sum to n_tokens and equal weights
    give exactly `partition_sizes`.
    """
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x <= 0 for x in w):
        raise ValueError(f"weights must be finite numbers > 0, one per partition, got {list(weights)!r}")
    P = len(w)
    if P > n_tokens:
        raise ValueError(f"num_partitions must be <= n_tokens, got {P} weights for {n_tokens} tokens")
    free = n_tokens - P                       # one token each first, the rest by weight
    total = sum(w)
    exact = [free * x / total for x in w]
    sizes = [1 + int(math.floor(e)) for e in exact]
    left = n_tokens - sum(sizes)
    # earlier partitions win ties, like tensor_split
    for i in sorted(range(P), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))[:left]:
        sizes[i] += 1
    return sizes


def partition_offsets(sizes: Sequence[int]) -> list:
    """Global offset o_i = n_1 + ... + n_{i-1} of each partition."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def segment_sizes(n: int, num_segments: int) -> list:
    """Alg. 2 / Eq. 8: sizes of the m contiguous segments of n tokens (they sum to n)."""
    n = _check_int("n", n, 1)
    num_segments = _check_int("num_segments", num_segments, 1)
    if num_segments > n:
        raise ValueError(f"num_segments must be <= the number of tokens n (1 <= m <= n), "
                         f"got num_segments={num_segments} > n={n}")
    return split_sizes(n, num_segments)


def num_means(n_tokens: int, compression_rate: float) -> int:
    """Eq. 16: m = min(n, max(1, ceil(n / CR))), the segments kept for n tokens."""
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    cr = check_compression_rate(compression_rate)
    return min(n_tokens, max(1, math.ceil(n_tokens / cr)))


def check_compression_rate(compression_rate) -> float:
    if isinstance(compression_rate, bool) or not isinstance(compression_rate, numbers.Real):
        raise ValueError(f"compression_rate must be a real number >= 1, got {compression_rate!r}")
    cr = float(compression_rate)
    if not math.isfinite(cr) or cr < 1.0:
        raise ValueError(f"compression_rate must be a finite number >= 1, got {compression_rate!r}")
    return cr


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Segment:
    """Tokens sent as one mean: global indices (ascending), their count, and the
    position used for causal masking (the last token)."""
    tokens: Tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.tokens)

    @property
    def position(self) -> int:
        return self.tokens[-1]


@dataclass(frozen=True)
class Partition:
    index: int
    offset: int
    size: int
    segments: Tuple[Segment, ...]

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def counts(self) -> Tuple[int, ...]:
        return tuple(s.count for s in self.segments)

    @property
    def positions(self) -> Tuple[int, ...]:
        return tuple(s.position for s in self.segments)

    @property
    def contiguous(self) -> bool:
        """True when the segments are Alg. 2's contiguous runs (the fused
        segment_means kernel computes them); else means are gathered by index."""
        return self.counts == tuple(segment_sizes(self.size, self.num_segments)) and all(
            s.tokens == tuple(range(s.tokens[0], s.tokens[0] + s.count)) for s in self.segments)

    @property
    def tokens(self) -> range:
        return range(self.offset, self.offset + self.size)


@dataclass(frozen=True)
class DeviceLayout:
    """What device i attends with: own tokens, then the segments it receives."""
    index: int
    offset: int                       # o_i, global position of its first token
    size: int                         # n_i
    sources: Tuple[int, ...]          # partitions whose segments it receives, in key order
    counts: Tuple[int, ...]           # every key row: 1 per own token, then segment counts
    key_positions: Tuple[int, ...]

    @property
    def query_positions(self) -> Tuple[int, ...]:
        return tuple(range(self.offset, self.offset + self.size))

    @property
    def num_keys(self) -> int:
        return len(self.counts)

    @property
    def tokens_received(self) -> int:
        """Rows (segment means) received per layer."""
        return self.num_keys - self.size


@dataclass(frozen=True)
class PrismPlan:
    n_tokens: int
    sizes: Tuple[int, ...]
    offsets: Tuple[int, ...]
    causal: bool
    partitions: Tuple[Partition, ...]
    devices: Tuple[DeviceLayout, ...]

    @property
    def num_partitions(self) -> int:
        return len(self.sizes)

    @property
    def means(self) -> Tuple[int, ...]:
        """m_j, the rows partition j sends per layer."""
        return tuple(p.num_segments for p in self.partitions)

    def device(self, i: int) -> DeviceLayout:
        return self.devices[self._index(i)]

    def receivers(self, j: int) -> Tuple[int, ...]:
        """Devices that receive partition j's segments."""
        j = self._index(j)
        return tuple(d.index for d in self.devices if j in d.sources)

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.num_partitions:
            raise ValueError(f"device index must be an integer in [0, {self.num_partitions}), got {i!r}")
        return int(i)


def _resolve_sizes(n_tokens, num_partitions, sizes, weights):
    given = [x is not None for x in (num_partitions, sizes, weights)]
    if sum(given) != 1:
        raise ValueError("give exactly one of num_partitions, sizes (tokens per partition) "
                         "or weights (relative device speeds)")
    if sizes is not None:
        sizes = [_check_int("sizes[i]", s, 1) for s in sizes]
        if not sizes or sum(sizes) != n_tokens:
            raise ValueError(f"sizes must be >= 1 each and sum to n_tokens={n_tokens}, got {sizes}")
        return sizes
    if weights is not None:
        return proportional_sizes(n_tokens, weights)
    return partition_sizes(n_tokens, num_partitions)


def _means_per_partition(sizes, num_means_, compression_rate):
    if (num_means_ is None) == (compression_rate is None):
        raise ValueError("give exactly one of num_means (means per partition) or compression_rate")
    if compression_rate is not None:
        return [num_means(n, compression_rate) for n in sizes]
    if isinstance(num_means_, numbers.Integral) and not isinstance(num_means_, bool):
        m = _check_int("num_means", num_means_, 1)
        return [min(m, n) for n in sizes]       # a partition cannot send more means than tokens
    ms = list(num_means_)
    if len(ms) != len(sizes):
        raise ValueError(f"num_means must be an int or one value per partition ({len(sizes)}), "
                         f"got {len(ms)} values")
    for m, n in zip(ms, sizes):
        segment_sizes(n, m)   # 1 <= m <= n, with the rule in the message
    return ms


def make_plan(n_tokens: int, num_partitions: Optional[int] = None,
              num_means: Union[int, Sequence[int], None] = None, *,
              compression_rate: Optional[float] = None, causal: bool = False,
              sizes: Optional[Sequence[int]] = None, weights: Optional[Sequence[float]] = None,
              anchors: Sequence[int] = (), grid: Optional[Tuple[int, int, int]] = None,
              anchor_budget: str = "shared", order: Optional[Sequence[int]] = None) -> PrismPlan:
    """The plan for N tokens. Give one of num_partitions / sizes / weights, and one of
    num_means (an int: at most that many per partition; or one per partition) /
    compression_rate (Eq. 16).

    anchors: global indices of tokens sent alone (count 1) instead of being averaged
    (attention sinks such as [CLS] or token 0; prism_kernels.anchors picks them).
    anchor_budget "shared": they come out of the partition's budget m_j, so it sends
    exactly m_j rows: k anchors and m_j - k means of the other tokens (when k >= m_j,
    only the first m_j - 1 anchors stay alone; at m_j = 1 it sends one plain mean);
    "extra": k anchors on top of m_j means.
    grid: (rows, cols, first) when tokens first .. first + rows*cols - 1 are image
    patches in row-major order: segments of those tokens are then compact 2-D blocks
    of the patch grid (recursive bisection) instead of runs that wrap across rows.
    order: permutes the received blocks (Eq. 5 tests)."""
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    if anchor_budget not in ("shared", "extra"):
        raise ValueError(f"anchor_budget must be 'shared' or 'extra', got {anchor_budget!r}")
    as_tuple = lambda v: None if v is None else (v if isinstance(v, numbers.Number) else tuple(v))
    anchors = tuple(sorted({_check_int("anchors[i]", a, 0) for a in anchors if a < n_tokens}))
    if grid is not None:
        rows, cols, first = (_check_int(f"grid[{k}]", g, 1 if k < 2 else 0) for k, g in enumerate(grid))
        if first + rows * cols > n_tokens:
            raise ValueError(f"grid (rows={rows}, cols={cols}, first={first}) needs "
                             f"{first + rows * cols} tokens, the sequence has {n_tokens}")
        grid = (rows, cols, first)
    # under torch.compile the plan is built while tracing (plain Python on ints); calling the
    # uncached function there is what dynamo does anyway, without its lru_cache warning
    build = _make_plan.__wrapped__ if torch.compiler.is_compiling() else _make_plan
    return build(n_tokens, num_partitions, as_tuple(num_means), compression_rate, bool(causal),
                      as_tuple(sizes), as_tuple(weights), anchors, grid, anchor_budget == "extra",
                      as_tuple(order))


plan_layout = make_plan   # the name the first releases used


def _blocks(tokens, m, grid):
    """Split `tokens` (ascending) into m groups: compact 2-D blocks for grid patches
    (bisect the longer side, sizes in proportion to the groups on each side), else runs."""
    if grid is None:
        out, start = [], 0
        for c in split_sizes(len(tokens), m):
            out.append(tokens[start:start + c])
            start += c
        return out
    rows, cols, first = grid

    def rc(t):
        return divmod(t - first, cols)

    def bisect(toks, m):
        if m == 1:
            return [tuple(sorted(toks))]
        rs = [rc(t)[0] for t in toks]
        cs = [rc(t)[1] for t in toks]
        by_row = (max(rs) - min(rs)) >= (max(cs) - min(cs))
        key = (lambda t: rc(t)) if by_row else (lambda t: (rc(t)[1], rc(t)[0]))
        toks = sorted(toks, key=key)
        m1 = m // 2
        cut = round(len(toks) * m1 / m)
        cut = min(max(cut, m1), len(toks) - (m - m1))   # every group keeps >= 1 token
        return bisect(toks[:cut], m1) + bisect(toks[cut:], m - m1)

    return sorted(bisect(list(tokens), m), key=lambda g: g[0])


def _partition_segments(o, n, m, anchors, grid, extra):
    own = [a for a in anchors if o <= a < o + n]
    if not extra and own and len(own) >= m:
        # shared budget: exactly m_j rows; the earliest anchors first ([CLS] before [SEP]),
        # and at m_j = 1 the partition's one plain mean
        own = own[:m - 1]
    taken = set(own)
    rest = [t for t in range(o, o + n) if t not in taken]
    segs = [(a,) for a in own]
    if rest:
        m_rest = min(len(rest), m if extra else m - len(own))
        patches = [] if grid is None else [t for t in rest if grid[2] <= t < grid[2] + grid[0] * grid[1]]
        if len(patches) >= m_rest and len(patches) == len(rest):
            segs += _blocks(tuple(rest), m_rest, grid)
        else:   # text, or a partition mixing patches and other tokens: contiguous runs
            segs += _blocks(tuple(rest), m_rest, None)
    return tuple(Segment(tuple(s)) for s in sorted(segs, key=lambda s: s[0]))


@functools.lru_cache(maxsize=4096)
def _make_plan(n_tokens, num_partitions, num_means_, compression_rate, causal, sizes, weights,
               anchors=(), grid=None, extra_anchors=False, order=None):
    sizes = _resolve_sizes(n_tokens, num_partitions, sizes, weights)
    P = len(sizes)
    offsets = partition_offsets(sizes)
    ms = _means_per_partition(sizes, num_means_, compression_rate)
    partitions = [Partition(j, o, n, _partition_segments(o, n, m, anchors, grid, extra_anchors))
                  for j, (o, n, m) in enumerate(zip(offsets, sizes, ms))]
    if order is not None and sorted(order) != list(range(P)):
        raise ValueError(f"order must be a permutation of range({P}), got {list(order)}")
    devices = []
    for i in range(P):
        counts = [1] * sizes[i]
        kpos = list(range(offsets[i], offsets[i] + sizes[i]))
        srcs = tuple(j for j in (order if order is not None else range(P)) if j != i and (not causal or j < i))
        for j in srcs:
            counts += partitions[j].counts
            kpos += partitions[j].positions
        devices.append(DeviceLayout(i, offsets[i], sizes[i], srcs, tuple(counts), tuple(kpos)))
    return PrismPlan(n_tokens, tuple(sizes), tuple(offsets), causal, tuple(partitions), tuple(devices))


# ------------------------------------------------------------------ tensors of a plan


def device_tensors(plan: PrismPlan, i: int, device=None):
    """(counts [Nk], q_pos [n_i], k_pos [Nk]) of device i, int64."""
    dev = plan.device(i)
    t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    return t(dev.counts), t(dev.query_positions), t(dev.key_positions)


def local_rows(x: torch.Tensor, plan: PrismPlan, i: int) -> torch.Tensor:
    """Rows of partition i of x along dim -2 (x holds all N rows)."""
    p = plan.partitions[plan._index(i)]
    return x[..., p.offset:p.offset + p.size, :]


def partition_means(x: torch.Tensor, part: Partition, *, backend: str = "auto"):
    """Segment means of one partition: x [..., n_j, D] holds the partition's rows
    (local order). Returns (means [..., m_j, D] in x's dtype, counts int64 [m_j]).

    Alg. 2's contiguous runs go to the fused segment_means op; any other segment
    shape is a gather-and-average in plain torch ops. Both are differentiable.
    """
    if x.shape[-2] != part.size:
        raise ValueError(f"x must hold the partition's {part.size} rows along dim -2, got {x.shape[-2]}")
    if part.contiguous:
        from .api import segment_means
        return segment_means(x, part.num_segments, backend=backend)
    counts = torch.tensor(part.counts, dtype=torch.int64, device=x.device)
    seg_of = torch.empty(part.size, dtype=torch.int64)
    for s, seg in enumerate(part.segments):
        seg_of[[t - part.offset for t in seg.tokens]] = s
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = list(x.shape)
    shape[-2] = part.num_segments
    sums = x.new_zeros(shape, dtype=acc).index_add(x.dim() - 2, seg_of.to(x.device), x.to(acc))
    return (sums / counts.to(acc).unsqueeze(-1)).to(x.dtype), counts


def device_keys_values(x: torch.Tensor, plan: PrismPlan, i: int, *, backend: str = "auto") -> torch.Tensor:
    """X~_i = [X_i ; segment means of each source partition] along dim -2 (Eq. 6-7)."""
    dev = plan.device(i)
    blocks = [local_rows(x, plan, i)]
    for j in dev.sources:
        blocks.append(partition_means(local_rows(x, plan, j), plan.partitions[j], backend=backend)[0])
    return torch.cat(blocks, dim=-2)

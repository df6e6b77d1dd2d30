"""What each device sees (docs/method.md; paper Eq. 6-7, 10, 17).

For a sequence split into P contiguous partitions with m_j segment means each,
device i gets
  * queries: its own rows, at global positions o_i .. o_i + n_i - 1;
  * keys/values: [own rows ; the means of every other partition j], with
    count 1 for own rows and the segment sizes for means;
  * key positions: own rows at their global positions, a mean at the global
    position of its segment's last token (so it is visible exactly when every
    token it stands for is);
  * in causal mode, means of later partitions are left out: they would be
    fully masked anyway, so the device need not even receive them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .partition import num_means as _num_means
from .partition import partition_offsets, partition_sizes, segment_sizes
from .segment_means import segment_means


@dataclass(frozen=True)
class DeviceLayout:
    index: int                    # partition / device i
    offset: int                   # global position of its first token, o_i
    size: int                     # n_i
    sources: Tuple[int, ...]      # partitions whose means it receives, in key order
    counts: Tuple[int, ...]       # count of every key row: 1s then segment sizes
    key_positions: Tuple[int, ...]

    @property
    def query_positions(self) -> Tuple[int, ...]:
        return tuple(range(self.offset, self.offset + self.size))

    @property
    def num_keys(self) -> int:
        return len(self.counts)

    @property
    def tokens_received(self) -> int:
        return self.num_keys - self.size


@dataclass(frozen=True)
class PrismPlan:
    n_tokens: int
    sizes: Tuple[int, ...]
    offsets: Tuple[int, ...]
    means: Tuple[int, ...]        # m_j per partition
    causal: bool
    devices: Tuple[DeviceLayout, ...]
    # explicit segments (global token lists per partition), or None for Alg. 2's runs
    segments: Optional[Tuple[Tuple[Tuple[int, ...], ...], ...]] = None


def _means_per_partition(sizes, num_means, compression_rate) -> List[int]:
    if (num_means is None) == (compression_rate is None):
        raise ValueError("give exactly one of num_means (means per partition) or compression_rate")
    if compression_rate is not None:
        return [_num_means(n, compression_rate) for n in sizes]
    if isinstance(num_means, numbers.Integral) and not isinstance(num_means, bool):
        ms = [int(num_means)] * len(sizes)
    else:
        ms = list(num_means)
        if len(ms) != len(sizes):
            raise ValueError(
                f"num_means must be an int or one value per partition ({len(sizes)}), got {len(ms)} values")
    for j, (m, n) in enumerate(zip(ms, sizes)):
        segment_sizes(n, m)  # raises with the rule 1 <= m <= n
    return ms


def plan_layout(n_tokens: int, num_partitions: int, num_means: Union[int, Sequence[int], None] = None,
                *, compression_rate: Optional[float] = None, causal: bool = False,
                order: Optional[Sequence[int]] = None) -> PrismPlan:
    """Layout of every device. `order` permutes the received blocks (Eq. 5 test)."""
    sizes = partition_sizes(n_tokens, num_partitions)
    offsets = partition_offsets(sizes)
    ms = _means_per_partition(sizes, num_means, compression_rate)
    devices = []
    for i in range(num_partitions):
        counts = [1] * sizes[i]
        kpos = list(range(offsets[i], offsets[i] + sizes[i]))
        js = [j for j in (order if order is not None else range(num_partitions))
              if j != i and (not causal or j < i)]
        for j in js:
            segs = segment_sizes(sizes[j], ms[j])
            counts += segs
            end = offsets[j]
            for s in segs:
                end += s
                kpos.append(end - 1)   # a mean sits at its segment's last token
        devices.append(DeviceLayout(i, offsets[i], sizes[i], tuple(js), tuple(counts), tuple(kpos)))
    return PrismPlan(n_tokens, tuple(sizes), tuple(offsets), tuple(ms), causal, tuple(devices))


def plan_from_segments(n_tokens: int, sizes: Sequence[int], segments, *, causal: bool = False) -> PrismPlan:
    """Layout for any segments: segments[j] lists partition j's segments, each a list
    of global token indices (anchors are one-token segments, image blocks any set).
    A segment counts as its number of tokens and sits at its latest token."""
    offsets = partition_offsets(list(sizes))
    segs = tuple(tuple(tuple(sorted(int(t) for t in s)) for s in part) for part in segments)
    for j, part in enumerate(segs):
        covered = sorted(t for s in part for t in s)
        if covered != list(range(offsets[j], offsets[j] + sizes[j])):
            raise ValueError(f"segments of partition {j} must cover its tokens exactly once")
    P = len(sizes)
    devices = []
    for i in range(P):
        counts = [1] * sizes[i]
        kpos = list(range(offsets[i], offsets[i] + sizes[i]))
        js = [j for j in range(P) if j != i and (not causal or j < i)]
        for j in js:
            counts += [len(s) for s in segs[j]]
            kpos += [max(s) for s in segs[j]]
        devices.append(DeviceLayout(i, offsets[i], sizes[i], tuple(js), tuple(counts), tuple(kpos)))
    return PrismPlan(n_tokens, tuple(sizes), tuple(offsets), tuple(len(p) for p in segs), causal,
                     tuple(devices), segs)


def local_rows(x: torch.Tensor, plan: PrismPlan, i: int) -> torch.Tensor:
    """Rows of partition i along dim -2."""
    return x[..., plan.offsets[i]:plan.offsets[i] + plan.sizes[i], :]


def device_keys_values(x: torch.Tensor, plan: PrismPlan, i: int) -> torch.Tensor:
    """X~_i = [X_i ; M_j for j in sources] along dim -2 (Eq. 6-7)."""
    dev = plan.devices[i]
    blocks = [local_rows(x, plan, i)]
    for j in dev.sources:
        if plan.segments is None:
            blocks.append(segment_means(local_rows(x, plan, j), plan.means[j])[0])
        else:   # one mean per explicit token list, summed in fp64 one token at a time
            means = []
            for seg in plan.segments[j]:
                acc = torch.zeros_like(x[..., 0, :], dtype=torch.float64)
                for t in seg:
                    acc = acc + x[..., t, :].double()
                means.append((acc / len(seg)).to(x.dtype))
            blocks.append(torch.stack(means, dim=-2))
    return torch.cat(blocks, dim=-2)


def device_tensors(plan: PrismPlan, i: int, device=None):
    """(counts [Nk] int64, q_pos [n_i] int64, k_pos [Nk] int64) of device i."""
    dev = plan.devices[i]
    t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    return t(dev.counts), t(dev.query_positions), t(dev.key_positions)

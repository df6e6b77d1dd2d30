"""Speed calibration (`prism run --calibrate`): before the first inference every rank
times one block of the model on a short input, rank 0 gathers the times and decides
the partition weights (speed = 1 / time, the fastest rank 1.0), and tells every rank,
so that all build the same plan (plan.proportional_sizes of those weights).

Rebalancing (`prism run --rebalance`): after each warm-up inference every rank reports
its rows and its own compute in that inference (the median over layers of each layer's
time less the time it waited for peers and spent posting transfers, times the layers),
and the weights become rows per second. That
measures the real work (every block, the exchange's own work, the communication threads
that share the rank's core and its quota) where the one-block timing misses some of it:
a rank at half a core measured 0.46 of the fast one by the block and took more than
twice as long per token in the forward (docs/distributed.md).

The timed window is at least `min_s` seconds of repeated runs and the time is their
mean, not a median of single runs: a device slowed by a CPU quota (cgroup cfs quota,
a shared machine) runs at full speed until its quota of the period is spent, so only a
window spanning several scheduler periods shows its sustained speed.
"""
from __future__ import annotations

import time
from typing import List, Sequence

import torch
import torch.distributed as dist

CALIBRATE_TOKENS = 64       # at most this many rows in the timed block (a short input)
CALIBRATE_MIN_S = 0.05      # timed window per rank (several cfs periods of 10 ms)
CALIBRATE_MIN_RUNS = 3


@torch.no_grad()
def time_one_block(entry, model, n_tokens: int, min_s: float = CALIBRATE_MIN_S,
                   min_runs: int = CALIBRATE_MIN_RUNS) -> float:
    """Mean seconds of the model's first block on n_tokens random rows (stock attention)."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")     # the distributed attention needs an exchange
    try:
        layer = entry.layers(model)[0]
        dtype = next(model.parameters()).dtype
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, n_tokens, model.config.hidden_size, generator=g).to(dtype)
        pos = torch.arange(n_tokens)
        entry.run_block(model, layer.block, h, pos)          # warm-up (allocations, kernels)
        runs, t0 = 0, time.perf_counter()
        while runs < min_runs or time.perf_counter() - t0 < min_s:
            entry.run_block(model, layer.block, h, pos)
            runs += 1
        return (time.perf_counter() - t0) / runs
    finally:
        model.set_attn_implementation(impl)


def speeds_from_times(times: Sequence[float]) -> List[float]:
    """Relative speeds 1 / t, the fastest 1.0."""
    fastest = min(times)
    return [fastest / t for t in times]


def agree_speeds(my_time: float) -> dict:
    """Every rank's time to rank 0, rank 0's decision to every rank: {"times_s", "speeds"}."""
    world = dist.get_world_size()
    times = [None] * world
    dist.all_gather_object(times, float(my_time))
    decision = [{"times_s": times, "speeds": speeds_from_times(times)} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def speeds_from_compute(rows: Sequence[int], compute_s: Sequence[float]) -> List[float]:
    """Relative speeds rows / compute of each rank (the fastest 1.0)."""
    if any(not (c > 0) for c in compute_s) or any(r < 1 for r in rows):
        raise ValueError(f"rows >= 1 and compute > 0 needed, got rows {list(rows)}, compute {list(compute_s)}")
    rate = [r / c for r, c in zip(rows, compute_s)]
    top = max(rate)
    return [x / top for x in rate]


def agree_rebalance(rows: int, compute_s: float) -> dict:
    """Every rank's (rows, compute) to rank 0, its new weights to every rank:
    {"rows", "compute_s", "speeds"}."""
    world = dist.get_world_size()
    got = [None] * world
    dist.all_gather_object(got, (int(rows), float(compute_s)))
    rs, cs = [g[0] for g in got], [g[1] for g in got]
    decision = [{"rows": rs, "compute_s": cs, "speeds": speeds_from_compute(rs, cs)}
                if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]

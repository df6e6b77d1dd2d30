"""Speed calibration (`prism run --calibrate`): before the first inference every rank
times one block of the model on a short input, rank 0 gathers the times and decides
the partition weights (speed = 1 / time, the fastest rank 1.0), and tells every rank,
so that all build the same plan (plan.proportional_sizes of those weights).

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

"""Where a rank's posting time goes: runs `python -m prism_kernels.distributed` (the same
arguments as `prism run`'s ranks) with gloo's irecv / isend wrapped to time each call, in
wall and in the calling thread's CPU time. A call that takes wall time without CPU time
blocked its thread (asleep in gloo). Prints, every 60 layer exchanges, per rank:
    POST_TIMING rank {name: (calls, total ms, median ms, max ms)}
Used by run_post_timing.sh; results in benchmarks/results/post_timing_s7.md.
"""
from __future__ import annotations

import collections
import os
import runpy
import statistics
import sys
import time

import torch.distributed as dist

from prism_kernels.distributed import comm as C

T = collections.defaultdict(list)


def _timed(name, fn):
    def call(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        r = fn(*a, **k)
        T[name].append(time.perf_counter() - t)
        T[name + "_cpu"].append(time.thread_time() - c)
        return r
    return call


def report():
    out = {k: (len(v), round(sum(v) * 1e3, 1), round(statistics.median(v) * 1e3, 3), round(max(v) * 1e3, 2))
           for k, v in sorted(T.items())}
    print("POST_TIMING", os.environ.get("RANK"), out, file=sys.stderr, flush=True)


C.dist.irecv = _timed("irecv", dist.irecv)
C.dist.isend = _timed("isend", dist.isend)
_start = C.Comm._start


def start(self, what, phase, *a, **k):
    t = time.perf_counter()
    r = _start(self, what, phase, *a, **k)
    T["Comm.start:" + phase].append(time.perf_counter() - t)
    if phase == "layer" and len(T["Comm.start:layer"]) % 60 == 0:
        report()      # the launcher exits without running atexit hooks
    return r


C.Comm._start = start
sys.argv = ["prism_kernels.distributed"] + sys.argv[1:]
runpy.run_module("prism_kernels.distributed", run_name="__main__")

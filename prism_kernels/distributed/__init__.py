"""Prism on several processes / machines with torch.distributed (see docs/distributed.md).

Modules: launch (the `prism run` entry point), comm (point-to-point exchanges with
deadlines and byte counting), handshake (config check before compute), runtime
(per-rank block loop on the plan of a PrismConfig and the model table of
prism_kernels.models), overlap (the attention function; local keys while the
means are in flight, LSE merge), calibrate (`--calibrate`: per-rank block timing, speeds
decided by rank 0).
"""
from .runtime import INPUTS, MODES, WIRE_DTYPES, RunConfig, Runtime, expected_recv_bytes, floats_per_row, wire_format

__all__ = ["INPUTS", "MODES", "WIRE_DTYPES", "RunConfig", "Runtime", "expected_recv_bytes", "floats_per_row",
           "wire_format"]

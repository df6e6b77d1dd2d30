"""Cost model of single-device, Voltage and Prism inference (docs/method.md, "Costs").

    from prism_kernels.costs import estimate
    r = estimate("gpt2", seq_len=256, num_partitions=2, compression_rate=10)
    r = estimate("qwen2-0.5b", seq_len=300, sizes=[200, 100], num_means=8)   # uneven partitions
    r.prism_gflops_per_device, r.compression_rate, r.to_dict()

Modules: model_configs (which model), flops (FLOPs counted by running the model
on the meta device under torch.utils.flop_counter), comm (tokens/bytes received),
report (CostReport, estimate), paper (the paper's figures).
"""
from .comm import (DTYPE_BYTES, INPUT_DTYPE_BYTES, STARTUP_INPUTS, WIRE_DTYPES, bytes_for, check_wire_dtype, dtype_bytes, floats_per_row,
                   received_tokens, row_bytes, startup_bytes, voltage_received_tokens, wire_format, wire_torch_dtype)
from .flops import COUNTED_TERMS, NOT_COUNTED_TERMS, FlopCount, device_flops, embedding_flops, meta_model
from .model_configs import PRESETS, ModelSpec, resolve_model
from .report import CostReport, estimate, format_report

__all__ = [
    "estimate", "CostReport", "format_report",
    "device_flops", "embedding_flops", "meta_model", "FlopCount", "COUNTED_TERMS", "NOT_COUNTED_TERMS",
    "received_tokens", "voltage_received_tokens", "bytes_for", "dtype_bytes", "DTYPE_BYTES",
    "startup_bytes", "STARTUP_INPUTS", "INPUT_DTYPE_BYTES",
    "wire_format", "floats_per_row", "WIRE_DTYPES", "check_wire_dtype", "wire_torch_dtype", "row_bytes",
    "resolve_model", "ModelSpec", "PRESETS",
]

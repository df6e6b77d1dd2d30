"""Accounting of a real forward under simulated Prism: what each device receives and computes.

    with accounting.record(model) as acct:       # model already under enable_prism
        model(**inputs)
    acct.devices          # one DeviceRecord per (layer, sequence, device)
    s = acct.summary()    # per device per layer bytes (Prism vs Voltage), GFLOPs (Prism, Voltage, single)

The plans are the ones the attention layers actually used (PrismConfig.plan of each
sequence's real length, recorded by the attention function), so padding, short
sequences, uneven partitions and causal plans are reflected. Tokens and bytes come
from prism_kernels.costs.comm and FLOPs from prism_kernels.costs.flops.device_flops,
the same code as `prism costs` (docs/method.md, "Costs"):

* tokens received per device per layer: Prism = the plan's `tokens_received` (causal
  models: earlier partitions only); Voltage = N - n_i. Bytes = tokens x the floats of a
  row on the runtime's wire (costs.comm.wire_format: attention-input rows, K/V rows, or
  matched K/V rows with a bias per KV head) x bytes per element of the model's dtype,
  plus each row's count (costs.comm.COUNT_BYTES) for the source partitions that choose
  their segments from their keys (dynamic.chooses; with a static plan the counts follow
  from the plan and are not sent; matched rows carry a bias instead), plus, for rows
  matched at the [CLS] query, that token's query on every device but the
  first (costs.comm.first_token_bytes). Voltage's rows are hidden states.
* FLOPs per device (whole forward): device_flops(config, q_rows=n_i, kv_rows=n_i +
  received), the received rows projected by the receiver only where the wire carries
  hidden rows (received_projected); Voltage kv_rows = N; single device q = kv = N. The classification head
  counts on device 0 only (it holds [CLS]); the master's embedding work
  (costs.embedding_flops) is added to device 0 and to single. Terms counted: see
  prism_kernels.costs.COUNTED_TERMS.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class DeviceRecord:
    layer: int
    sequence: int
    device: int
    n_tokens: int          # N of the sequence (real tokens)
    own_tokens: int        # n_i (queries)
    received_tokens: int   # means received this layer
    voltage_tokens: int    # N - n_i
    counted_rows: int = 0  # received rows whose counts travel too (segments chosen from the keys)


class Account:
    def __init__(self, model):
        self.model = model
        self.devices: List[DeviceRecord] = []
        self.num_layers = 0
        self.wire = "hidden"
        self.bias = "log"

    def _collect(self, per_layer):
        from prism_kernels import dynamic
        from prism_kernels.anchors import resolve
        from .attention import get_prism_config, get_token_roles
        from prism_kernels.costs.comm import MATCHED_BIASES, wire_format
        cfg, roles = get_prism_config(self.model), get_token_roles(self.model)
        self.num_layers = len(per_layer)
        for layer, entries in enumerate(per_layer):
            for rows, plan in entries:
                bias = self.bias = cfg.bias_for(plan.causal, roles)
                self.wire = wire_format(self.model.config, "prism", cfg.averaging, bias)
                counted = [0] * plan.num_partitions
                if cfg.dynamic and bias not in MATCHED_BIASES:
                    anchors, grid = resolve(plan.n_tokens, roles, cfg.anchors, cfg.segments)
                    counted = dynamic.counted_rows(cfg, plan, anchors, grid)
                for b in rows.tolist():
                    for d in plan.devices:
                        self.devices.append(DeviceRecord(layer, b, d.index, plan.n_tokens, d.size,
                                                         d.tokens_received, plan.n_tokens - d.size,
                                                         counted[d.index]))

    def summary(self, dtype_bytes: int = None) -> dict:
        """Per device per layer tokens and bytes received (mean over sequences and devices);
        GFLOPs of the whole forward per sequence: *_per_device = mean over devices (the
        paper's total / P), *_max_device = the sequence's largest device, single_gflops =
        one device running it; all averaged over sequences. *_total_gflops: whole batch."""
        from prism_kernels.costs import bytes_for, device_flops, embedding_flops
        from prism_kernels.costs import dtype_bytes as _dtype_bytes
        from prism_kernels.costs.comm import COUNT_BYTES, first_token_bytes, floats_per_row, receiver_projects

        cfg = self.model.config
        if dtype_bytes is None:
            dtype_bytes = _dtype_bytes(next(self.model.parameters()).dtype)
        emb = embedding_flops(cfg).total
        layer0 = [r for r in self.devices if r.layer == 0]
        if not layer0:
            raise ValueError("nothing recorded: run a forward of the model inside record(model)")
        seqs = {}
        for r in layer0:
            seqs.setdefault(r.sequence, []).append(r)
        gf = lambda r, kv, projected=True: (device_flops(cfg, r.own_tokens, kv, holds_first_token=r.device == 0,
                                                         received_projected=projected).total
                                            + (emb if r.device == 0 else 0)) / 1e9
        per = {"prism": [], "voltage": []}            # per sequence: GFLOPs of each device
        single = []
        for devs in seqs.values():
            n = devs[0].n_tokens
            single.append((device_flops(cfg, n, n, holds_first_token=True).total + emb) / 1e9)
            per["prism"].append([gf(r, r.own_tokens + r.received_tokens, receiver_projects(self.wire))
                                 for r in devs])
            per["voltage"].append([gf(r, n) for r in devs])
        mean = lambda xs: sum(xs) / len(xs)
        pt, vt = mean([r.received_tokens for r in layer0]), mean([r.voltage_tokens for r in layer0])
        row = bytes_for(1, floats_per_row(cfg, self.wire), dtype_bytes)
        counted = mean([r.counted_rows for r in layer0])
        # rows matched at the [CLS] query: its query reaches every other device
        first = mean([first_token_bytes(cfg, self.bias, holder=r.device == 0, compute_bytes=dtype_bytes)
                      for r in layer0])
        out = {"sequences": len(seqs), "layers": self.num_layers, "hidden_size": cfg.hidden_size,
               "dtype_bytes": dtype_bytes,
               "prism_tokens_per_device_layer": pt, "voltage_tokens_per_device_layer": vt,
               "prism_bytes_per_device_layer": row * pt + COUNT_BYTES * counted + first,
               "voltage_bytes_per_device_layer": bytes_for(1, cfg.hidden_size, dtype_bytes) * vt,
               "compression_rate": (vt / pt) if pt else None,
               "single_gflops": mean(single), "single_total_gflops": sum(single)}
        for who, seq in per.items():
            out[f"{who}_gflops_per_device"] = mean([mean(s) for s in seq])   # a sequence's total / its devices
            out[f"{who}_gflops_max_device"] = mean([max(s) for s in seq])
            out[f"{who}_total_gflops"] = sum(sum(s) for s in seq)
        return out


@contextlib.contextmanager
def record(model):
    """Record the plans of the attention calls of ONE forward run inside the block."""
    if getattr(model, "_prism_state", None) is None:
        raise ValueError("accounting.record needs a model under prism_kernels.hf.enable_prism")
    acct = Account(model)
    mods = list(model.modules())
    for m in mods:
        m._prism_plans = []
    try:
        yield acct
    finally:
        per_layer = [m._prism_plans for m in mods if m._prism_plans]
        for m in mods:
            del m._prism_plans
        acct._collect(per_layer)

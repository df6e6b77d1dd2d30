"""Accounting of a real forward under simulated Prism: what each device receives and computes.

    with accounting.record(model) as acct:       # model already under enable_prism
        model(**inputs)
    acct.devices          # one DeviceRecord per (layer, sequence, device)
    s = acct.summary()    # per device per layer bytes (Prism vs Voltage), GFLOPs (Prism, Voltage, single)

The layouts are the ones the attention layers actually used (recorded by the
attention function, so padding, short sequences and causal plans are
reflected). Tokens and bytes come from prism_kernels.costs.comm and FLOPs from
prism_kernels.costs.flops.device_flops -- the same code as `prism costs`:

* tokens received per device per layer: Prism = the segment means the device
  received (causal models: earlier partitions only, as the simulation does);
  Voltage = N - n_i. Bytes = tokens x hidden size x bytes per element of the
  model's dtype (counts are not sent: they follow from n_j and m_j).
* FLOPs per device (whole forward): device_flops(config, q_rows=n_i,
  kv_rows=n_i + received); Voltage kv_rows = N; single device q = kv = N. The
  classification head counts on device 0 only (it holds [CLS]); the master's
  embedding work (costs.embedding_flops) is added to device 0 and to single.
  Terms counted: see prism_kernels.costs.COUNTED_TERMS.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List


@dataclass(frozen=True)
class DeviceRecord:
    layer: int
    sequence: int
    device: int
    n_tokens: int          # N of the sequence (real tokens)
    own_tokens: int        # n_i (queries)
    received_tokens: int   # means received this layer
    voltage_tokens: int    # N - n_i


class Account:
    def __init__(self, model):
        self.model = model
        self.devices: List[DeviceRecord] = []
        self.num_layers = 0

    # -- recording ----------------------------------------------------------
    def _collect(self, per_layer):
        self.num_layers = len(per_layer)
        for layer, entries in enumerate(per_layer):
            for rows, plan in entries:
                for b in rows.tolist():
                    for d in plan.devices:
                        self.devices.append(DeviceRecord(layer, b, d.index, plan.n_tokens, d.size,
                                                         d.tokens_received, plan.n_tokens - d.size))

    # -- derived figures ----------------------------------------------------
    def _sequences(self) -> Dict[int, List[DeviceRecord]]:
        seqs: Dict[int, List[DeviceRecord]] = {}
        for r in self.devices:
            if r.layer == 0:
                seqs.setdefault(r.sequence, []).append(r)
        return seqs

    def summary(self, dtype_bytes: int = None) -> dict:
        """Per device per layer tokens and bytes received (mean over sequences and devices);
        GFLOPs of the whole forward per sequence: *_per_device = mean over devices (the
        paper's total / P), *_max_device = the sequence's largest device, single_gflops =
        one device running it; all averaged over sequences. *_total_gflops: whole batch."""
        from prism_kernels.costs import bytes_for, device_flops, embedding_flops
        from prism_kernels.costs import dtype_bytes as _dtype_bytes

        cfg = self.model.config
        hidden = cfg.hidden_size
        if dtype_bytes is None:
            dtype_bytes = _dtype_bytes(next(self.model.parameters()).dtype)
        emb = embedding_flops(cfg).total
        layer0 = [r for r in self.devices if r.layer == 0]
        if not layer0:
            raise ValueError("nothing recorded: run a forward of the model inside record(model)")
        pt = sum(r.received_tokens for r in layer0) / len(layer0)
        vt = sum(r.voltage_tokens for r in layer0) / len(layer0)
        single = prism = volt = 0.0
        prism_dev, volt_dev, prism_max, volt_max = [], [], [], []   # per sequence
        for seq, devs in sorted(self._sequences().items()):
            n = devs[0].n_tokens
            single += (device_flops(cfg, n, n, holds_first_token=True).total + emb) / 1e9
            ps, vs = [], []
            for r in devs:
                extra = emb if r.device == 0 else 0
                first = r.device == 0
                ps.append((device_flops(cfg, r.own_tokens, r.own_tokens + r.received_tokens,
                                        holds_first_token=first).total + extra) / 1e9)
                vs.append((device_flops(cfg, r.own_tokens, n, holds_first_token=first).total + extra) / 1e9)
            prism_dev.append(sum(ps) / len(ps))
            volt_dev.append(sum(vs) / len(vs))
            prism_max.append(max(ps))
            volt_max.append(max(vs))
            prism += sum(ps)
            volt += sum(vs)
        nseq = len(self._sequences())
        return {
            "sequences": nseq,
            "layers": self.num_layers,
            "hidden_size": hidden,
            "dtype_bytes": dtype_bytes,
            "prism_tokens_per_device_layer": pt,
            "voltage_tokens_per_device_layer": vt,
            "prism_bytes_per_device_layer": bytes_for(1, hidden, dtype_bytes) * pt,
            "voltage_bytes_per_device_layer": bytes_for(1, hidden, dtype_bytes) * vt,
            "compression_rate": (vt / pt) if pt else None,
            # paper style: a sequence's total over its devices / its number of devices
            "prism_gflops_per_device": sum(prism_dev) / nseq,
            "prism_gflops_max_device": sum(prism_max) / nseq,     # per sequence, its largest device
            "voltage_gflops_per_device": sum(volt_dev) / nseq,
            "voltage_gflops_max_device": sum(volt_max) / nseq,
            "single_gflops": single / nseq,
            "prism_total_gflops": prism,
            "voltage_total_gflops": volt,
            "single_total_gflops": single,
        }


@contextlib.contextmanager
def record(model):
    """Record the device layouts of the attention calls of ONE forward run inside the block."""
    if getattr(model, "_prism_state", None) is None:
        raise ValueError("accounting.record needs a model under prism_kernels.hf.enable_prism")
    acct = Account(model)
    lists = []
    for m in model.modules():
        m._prism_plans = []
        lists.append(m)
    try:
        yield acct
    finally:
        per_layer = [m._prism_plans for m in lists if m._prism_plans]
        for m in lists:
            del m._prism_plans
        acct._collect(per_layer)

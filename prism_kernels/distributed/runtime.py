"""The per-rank loop: master scatter, blocks on the local partition with a means
exchange per layer, gather for the head (SPEC sec. 8).

Modes
  prism    each device receives the segment means of the other partitions
           (only of earlier ones in causal models) and attends with the
           scaling-aware softmax;
  voltage  each device receives the other partitions' full hidden states
           (earlier ones only in causal models) and recomputes their K/V: exact;
  single   rank 0 runs the stock model; the other ranks only wait.

What the means are taken of (`means_of`)
  block  the block input X (the paper's choice): K/V of a mean = proj(prenorm(mean X)).
         Only hidden-state means can carry this (the pre-norm is not affine), so
         the wire carries D floats per mean.
  kv     the keys and values (after rotary for Llama) = for non-rotary models the
         same as means of the attention input, projected. The wire carries the
         smaller of the two where both give the same result: attention-input means
         (D floats per mean) for non-rotary models when D <= 2*Hkv*d, else K/V means
         (2*Hkv*d floats per mean; the only exact one for rotary models).
  Default: block for non-rotary families, kv for Llama.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import prism_kernels as pk
from python_ref.layout import plan_layout

from . import overlap
from .comm import Comm
from .model_adapters import Adapter

MODES = ("prism", "voltage", "single")


@dataclass
class RunConfig:
    mode: str = "prism"
    num_means: Optional[int] = None          # means per partition, or
    compression_rate: Optional[float] = None
    means_of: Optional[str] = None           # "block" | "kv"; None = family default
    overlap: bool = True
    gather: str = "head"                     # "head" | "all"

    def resolved_means_of(self, adapter: Adapter) -> str:
        if self.means_of is None:
            return "kv" if adapter.rotary else "block"
        if self.means_of not in ("block", "kv"):
            raise ValueError(f"means_of must be 'block' or 'kv', got {self.means_of!r}")
        if self.means_of == "block" and adapter.rotary and self.mode == "prism":
            raise ValueError("means_of='block' is not defined for rotary models (a mean has no single "
                             "position); use means_of='kv'")
        return self.means_of


def wire_format(adapter: Adapter, mode: str, means_of: str) -> str:
    """'hidden' (D floats per row) or 'kv' (2*Hkv*d floats per row)."""
    if mode == "voltage" or means_of == "block":
        return "hidden"
    D, kv = adapter.hidden_size, 2 * adapter.num_kv_heads * adapter.head_dim
    if adapter.rotary or kv < D:
        return "kv"
    return "hidden"


def floats_per_row(adapter: Adapter, wire: str) -> int:
    return adapter.hidden_size if wire == "hidden" else 2 * adapter.num_kv_heads * adapter.head_dim


def make_plan(n_tokens: int, world: int, cfg: RunConfig, causal: bool):
    if cfg.mode == "voltage":
        from python_ref.partition import partition_sizes
        sizes = partition_sizes(n_tokens, world)
        return plan_layout(n_tokens, world, list(sizes), causal=causal)
    if cfg.num_means is None and cfg.compression_rate is None:
        raise ValueError("prism mode needs num_means (-m) or compression_rate (--cr)")
    if cfg.num_means is not None:
        from python_ref.partition import partition_sizes
        sizes = partition_sizes(n_tokens, world)
        # m per partition, capped by the partition size (uneven partitions)
        return plan_layout(n_tokens, world, [min(cfg.num_means, n) for n in sizes], causal=causal)
    return plan_layout(n_tokens, world, compression_rate=cfg.compression_rate, causal=causal)


def expected_recv_bytes(plan, adapter: Adapter, wire: str, rank: int, batch: int = 1) -> int:
    """Cost model of one layer for one device: tokens received (sum of the other
    partitions' means; N - n_i in Voltage) x floats per row x 4 bytes (fp32)."""
    return plan.devices[rank].tokens_received * floats_per_row(adapter, wire) * 4 * batch


# ------------------------------------------------------------------------------------------
# faults (tests only): PRISM_FAULT="die:rank=1:layer=1" or "stall:rank=1:layer=0:seconds=60"

def _fault_spec():
    spec = os.environ.get("PRISM_FAULT", "")
    if not spec:
        return None
    kind, *kvs = spec.split(":")
    d = dict(kv.split("=") for kv in kvs)
    return kind, int(d.get("rank", 1)), int(d.get("layer", 0)), float(d.get("seconds", 3600))


def _maybe_fault(rank: int, layer: int):
    f = _fault_spec()
    if f is None:
        return
    kind, r, L, secs = f
    if r == rank and L == layer:
        import sys
        sys.stderr.write(f"PRISM_FAULT {kind} rank {rank} layer {layer} at {time.time():.3f}\n")
        sys.stderr.flush()
        if kind == "die":
            os._exit(17)
        if kind == "stall":
            time.sleep(secs)


# ------------------------------------------------------------------------------------------

class LayerCtx:
    """What the attention function needs for one layer on one rank."""

    def __init__(self, rt: "Runtime", layer: int, block):
        self.rt, self.layer, self.block = rt, layer, block
        self.causal = rt.adapter.causal
        self.q_pos = rt.q_pos
        self.overlap = rt.cfg.overlap
        self.pending = None
        self.attn_input = None
        self.needs_kv_exchange = rt.cfg.mode == "prism" and rt.means_of == "kv"

    # -- exchange ---------------------------------------------------------------------
    def start_block_exchange(self, h: torch.Tensor):
        rt = self.rt
        payload = h if rt.cfg.mode == "voltage" else pk.segment_means(h, rt.plan.means[rt.rank])[0]
        self._start(payload, width=rt.adapter.hidden_size)

    def start_kv_exchange(self, k: torch.Tensor, v: torch.Tensor):
        rt = self.rt
        m = rt.plan.means[rt.rank]
        if rt.wire == "kv":
            km = pk.segment_means(k, m)[0]
            vm = pk.segment_means(v, m)[0]
            payload = torch.stack([km, vm], dim=1)          # [B, 2, Hkv, m, d]
        else:
            payload = pk.segment_means(self.attn_input, m)[0]  # [B, m, D]
        self._start(payload, width=None)

    def _start(self, payload, width):
        rt = self.rt
        send = {p: payload for p in rt.receivers}
        recv = {j: rt.recv_buffer(j) for j in rt.sources}
        self.pending = rt.comm.start(f"layer {self.layer} exchange", "layer", self.layer, send, recv)

    def receive_kv(self, dtype):
        """Wait for this layer's rows; (k, v, counts, positions) of all received keys."""
        rt = self.rt
        if not rt.sources:
            if self.pending is not None:
                self.pending.wait()       # our sends must complete too
            return None
        got = self.pending.wait()
        ks, vs = [], []
        for j in rt.sources:
            t = got[j]
            if rt.wire == "kv" and rt.cfg.mode == "prism":
                ks.append(t[:, 0])
                vs.append(t[:, 1])
            elif rt.cfg.mode == "prism" and rt.means_of == "kv":
                k, v = rt.adapter.kv_from_attn_input(self.block, t)
                ks.append(k)
                vs.append(v)
            else:
                pos = rt.pos_of[j] if rt.adapter.rotary else None
                k, v = rt.adapter.kv_from_block_input(self.block, t, pos)
                ks.append(k)
                vs.append(v)
        return (torch.cat(ks, 2).to(dtype), torch.cat(vs, 2).to(dtype), rt.remote_counts, rt.remote_pos)


class Runtime:
    """One rank's state for one model, one input length and one configuration."""

    def __init__(self, adapter: Adapter, comm: Comm, cfg: RunConfig, n_tokens: int, batch: int = 1):
        self.adapter, self.comm, self.cfg = adapter, comm, cfg
        self.rank, self.world = comm.rank, comm.world
        self.batch = batch
        self.means_of = cfg.resolved_means_of(adapter)
        self.wire = wire_format(adapter, cfg.mode, self.means_of)
        self.n_tokens = n_tokens
        self.plan = make_plan(n_tokens, self.world, cfg, adapter.causal) if cfg.mode != "single" else None
        if self.plan is not None:
            dev = self.plan.devices[self.rank]
            self.sources = list(dev.sources)
            self.receivers = [j for j in range(self.world) if j != self.rank and
                              self.rank in self.plan.devices[j].sources]
            self.q_pos = torch.tensor(dev.query_positions, dtype=torch.int64)
            n = dev.size
            self.remote_counts = torch.tensor(dev.counts[n:], dtype=torch.int64)
            self.remote_pos = torch.tensor(dev.key_positions[n:], dtype=torch.int64)
            self.pos_of = {j: torch.arange(self.plan.offsets[j], self.plan.offsets[j] + self.plan.sizes[j])
                           for j in range(self.world)}
        self._capture_hooks = []
        if cfg.mode == "prism" and self.means_of == "kv" and self.wire == "hidden":
            for block in adapter.blocks():
                mod = adapter.attention_module(block)
                self._capture_hooks.append(mod.register_forward_pre_hook(self._capture, with_kwargs=True))

    @staticmethod
    def _capture(module, args, kwargs):
        ctx = overlap.current()
        if ctx is not None:
            ctx.attn_input = args[0] if args else kwargs["hidden_states"]

    def recv_buffer(self, j: int) -> torch.Tensor:
        rows = self.plan.sizes[j] if self.cfg.mode == "voltage" else self.plan.means[j]
        a = self.adapter
        if self.wire == "kv" and self.cfg.mode == "prism":
            return torch.empty(self.batch, 2, a.num_kv_heads, rows, a.head_dim)
        return torch.empty(self.batch, rows, a.hidden_size)

    def expected_layer_bytes(self) -> int:
        return expected_recv_bytes(self.plan, self.adapter, self.wire, self.rank, self.batch)

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """One inference. `inputs` on rank 0 (ignored elsewhere). Returns on rank 0
        {"head": model output, "hidden": final-normed hidden rows (all when gathered)}."""
        a, cfg = self.adapter, self.cfg
        if cfg.mode == "single":
            if self.rank != 0:
                return None
            hidden, head = a.stock_forward(inputs)
            return {"head": head, "hidden": hidden}
        rank, plan = self.rank, self.plan
        D = a.hidden_size
        # 1. master: embed and scatter the partitions
        if rank == 0:
            x = a.embed(inputs)
            parts = torch.split(x, list(plan.sizes), dim=1)
            send = {j: parts[j] for j in range(1, self.world)}
            pend = self.comm.start("scatter of the partitions", "scatter", 0, send, {})
            h = parts[0].contiguous()
            pend.wait()
        else:
            buf = torch.empty(self.batch, plan.sizes[rank], D)
            h = self.comm.start("scatter of the partitions", "scatter", 0, {}, {0: buf}).wait()[0]
        # 2. blocks
        for L, block in enumerate(a.blocks()):
            _maybe_fault(rank, L)
            ctx = LayerCtx(self, L, block)
            if not ctx.needs_kv_exchange:
                ctx.start_block_exchange(h)
            with overlap.use_layer(ctx):
                h = a.run_block(block, h, self.q_pos)
            if ctx.pending is None:
                raise RuntimeError(f"layer {L}: the attention function did not run (wrong attn implementation?)")
        # 3. final norm and gather
        h = a.final_norm(h)
        gather_all = a.causal or cfg.gather == "all"
        if not gather_all:
            if rank != 0:
                return None
            return {"head": a.head(h[:, :1]), "hidden": h}
        if rank != 0:
            self.comm.start("gather of the outputs", "gather", 0, {0: h}, {}).wait()
            return None
        bufs = {j: torch.empty(self.batch, plan.sizes[j], D) for j in range(1, self.world)}
        got = self.comm.start("gather of the outputs", "gather", 0, {}, bufs).wait()
        full = torch.cat([h] + [got[j] for j in range(1, self.world)], dim=1)
        return {"head": a.head(full) if a.causal else a.head(full[:, :1]), "hidden": full}

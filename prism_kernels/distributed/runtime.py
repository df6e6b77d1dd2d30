"""The per-rank loop: the master sends each rank its slice of the raw input (or,
with input "hidden", embeds everything and scatters the partitions), every rank runs the blocks on its partition with an exchange per layer, the master
gathers what the head needs (docs/distributed.md).

Modes
  prism    each device receives the segment means of the other partitions
           (only of earlier ones in causal models, docs/method.md "Causal mask")
           and attends with the scaling-aware softmax;
  voltage  each device receives the other partitions' full block input (earlier
           ones only in causal models) and computes their K/V itself: exact;
  single   rank 0 runs the stock model; the other ranks only wait.

The settings are a PrismConfig (P = the world size, m or CR, partition weights,
averaging); its plan (`PrismConfig.plan`) says what each rank holds, sends and
receives. What the means are taken of is the config's `averaging`
(docs/method.md, "What is averaged"):
  attention_input  (default) means of the keys'/values' input. For non-rotary
                   models mean(x) W + b = mean(x W + b), so the wire carries the
                   smaller of the two: D floats per mean ("hidden": the attention
                   input rows, projected by the receiver) when D <= 2*Hkv*d, else
                   the K/V means ("kv", 2*Hkv*d floats). Rotary models always
                   send "kv": the rotated K/V means (the only exact choice).
  block_input      the paper's: means of the block input ("hidden", D floats); the
                   receiver applies its own pre-attention norm and K/V projections,
                   and for rotary models rotates the key by the segment's average
                   rotation (mean cos, mean sin).
Voltage always sends "hidden" rows (the block input).

Data-dependent segments (PrismConfig.dynamic: anchors "special+topk", segments
"content" / "content_sse" / "kmeans"; prism_kernels/dynamic.py): the plan fixes the
rows m_j and the special anchors; in every layer each rank chooses its segments
from its own keys, as the simulation does, and sends each row's count with it (one
message per receiver: the int32 counts [B, m_j], then the rows in the wire dtype,
as bytes). The means then leave from inside the attention, once the keys exist
(also on the "hidden" wire, whose rows are the attention input averaged by the
same segments). Receivers take the counts into the log-count bias; positions are
the plan's (only earlier partitions are received in causal models, never masked).
A partition whose rows leave no choice (dynamic.chooses: e.g. m_j = 1, or one row
beside its special anchors) has the static plan's segments: it is sent as a static
plan, without counts and from the pre-hook.

Rows matched at the mean query (count_bias "matched*", and "auto" for text encoders;
hf/matched_summary.py): each row is its segment's keys and values weighted at the sending
partition's mean query, with a bias per KV head in place of its count (wire "matched":
[B, Hkv, m_j, 2d + 1], the bias last; no counts travel). Where the layer has separate
q / k / v projections and unrotated keys they leave from the value projection's hook,
built from the layer's own queries, keys and values (nothing is projected twice); else
from inside the attention. For rows matched at the [CLS] query ("matched_cls", the
default for vision encoders) rank 0 sends the first token's query to the other ranks from
its query projection's hook. The receiver adds the bias to its scores as one more head
dimension (spread_bias.extra_score_dim) and projects nothing.

Start-up (RunConfig.input, `--input`):
  raw      (default) rank 0 sends rank i only the part of the input it needs to embed
           its own tokens (ModelType.input_slice: its token ids; for an image the pixel
           rows of its patch rows, in the input's dtype) and every rank embeds its rows
           at their global positions (ModelType.embed_slice). Ids are 8 bytes a token
           instead of 4*D, and each rank does its own share of the embedding.
  hidden   rank 0 embeds all N rows and sends rank i its partition of hidden states.
  local    nothing is sent: every rank already holds the input (a device that owns a
           sensor or a text shard) and embeds only its own slice of it, as in raw.
All give the same rows (tests); the bytes are costs.comm.startup_bytes.

Wire dtype (RunConfig.wire_dtype, `--wire-dtype`): every per-layer payload is cast
to it before sending and back to the compute dtype on receipt, so fp16 / bf16 halve
the bytes of every layer; the computation stays in the model's dtype. The start-up
scatter (hidden states or the raw input as given) and the gather of the outputs stay in the compute dtype: they
happen once per inference, and the gathered rows are the result itself.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .. import dynamic
from ..anchors import resolve
from ..config import PrismConfig
from ..hf.matched_summary import MATCHED, matched_summary
from ..costs.comm import (COUNT_BYTES, INPUT_DTYPE_BYTES, MATCHED_AT_FIRST_TOKEN, WIRE_DTYPES, bytes_for,  # noqa: F401
                          check_wire_dtype, first_token_bytes, floats_per_row, row_bytes, startup_bytes,
                          wire_format, wire_torch_dtype)  # (some re-exported)
from ..models import apply_rotary, lookup
from ..plan import partition_means
from ..policy_args import RUNTIME_COUNT_BIASES
from . import overlap
from .comm import Comm

MODES = ("prism", "voltage", "single")
INPUTS = ("raw", "hidden", "local")


@dataclass
class RunConfig:
    mode: str = "prism"
    prism: Optional[PrismConfig] = None      # prism mode: P (= world size), m or CR, averaging, weights
    overlap: bool = True
    gather: str = "head"                     # "head" | "all"
    wire_dtype: str = "fp32"                 # element type of the per-layer exchange (WIRE_DTYPES)
    input: str = "raw"                       # what rank 0 sends at start-up: "raw" input slices | "hidden" rows

    def __post_init__(self):
        check_wire_dtype(self.wire_dtype)
        # one wire dtype: the PrismConfig's (which the simulation rounds to) and this one agree
        if self.prism is not None and self.prism.wire_dtype != self.wire_dtype:
            if "fp32" not in (self.prism.wire_dtype, self.wire_dtype):
                raise ValueError(f"wire_dtype {self.wire_dtype!r} differs from the PrismConfig's "
                                 f"{self.prism.wire_dtype!r}")
            wd = self.wire_dtype if self.wire_dtype != "fp32" else self.prism.wire_dtype
            self.wire_dtype, self.prism = wd, dataclasses.replace(self.prism, wire_dtype=wd)
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.gather not in ("head", "all"):
            raise ValueError(f"gather must be 'head' or 'all', got {self.gather!r}")
        if self.mode == "prism" and self.prism is None:
            raise ValueError("prism mode needs a PrismConfig (num_means or compression_rate)")
        if self.prism is not None and self.prism.count_bias not in RUNTIME_COUNT_BIASES:
            raise ValueError(f"count_bias={self.prism.count_bias!r} is an experiment of the one-process "
                             "simulation (prism_kernels.hf); the runtime takes count_bias one of "
                             f"{', '.join(map(repr, RUNTIME_COUNT_BIASES))}")

    @property
    def dynamic(self) -> bool:
        """Prism with data-dependent segments: counts travel with the rows."""
        return self.mode == "prism" and self.prism.dynamic

    @property
    def averaging(self) -> Optional[str]:
        """What the means are taken of (prism mode; None in voltage / single: no means)."""
        return self.prism.averaging if self.mode == "prism" else None

    def plan(self, n_tokens: int, world: int, causal: bool, roles=None):
        """The plan of this run (None in single mode). Voltage is the plan at CR = 1:
        every token its own segment, so a device receives the partitions' full rows."""
        if self.mode == "single":
            return None
        cfg = self.prism or PrismConfig(num_partitions=world, compression_rate=1.0)
        if cfg.num_partitions != world:
            raise ValueError(f"the PrismConfig has {cfg.num_partitions} partitions but the world size is {world}")
        if self.mode == "voltage":
            cfg = dataclasses.replace(cfg, num_means=None, compression_rate=1.0, anchors="none", segments="runs")
        # data-dependent segments: the plan's static part; the ranks choose the rest per layer
        plan = cfg.plan(n_tokens, causal, roles=roles, static=True)
        if plan.num_partitions != world:
            raise ValueError(f"{world} partitions (world size) for {n_tokens} tokens; P must be <= N")
        return plan


def expected_recv_bytes(plan, model_config, wire: str, rank: int, batch: int = 1,
                        wire_dtype: str = "fp32", counted_rows: int = 0, count_bias: str = "log",
                        compute_bytes: int = 4) -> int:
    """Cost model of one layer for one device: rows received (the segment means of its
    source partitions; their full rows in Voltage) x bytes per row (floats per row x
    bytes per element of the wire dtype), plus COUNT_BYTES for each of the
    `counted_rows` whose segments were chosen from the keys (dynamic.counted_rows), plus
    the first token's query for rows matched at the [CLS] query
    (costs.comm.first_token_bytes, in the compute dtype)."""
    rows = bytes_for(plan.devices[rank].tokens_received * batch, row_bytes(model_config, wire, wire_dtype), 1)
    first = first_token_bytes(model_config, count_bias, holder=(rank == 0), batch=batch, compute_bytes=compute_bytes)
    return rows + counted_rows * batch * COUNT_BYTES + first


def to_wire(payload: torch.Tensor, dtype: torch.dtype, what: str = "a payload") -> torch.Tensor:
    """payload cast to the wire dtype. fp16 overflows to inf beyond 65504 (bf16 has
    fp32's range), which would turn into NaNs on the receiver: refused instead."""
    out = payload.to(dtype)
    if dtype == torch.float16 and payload.dtype != torch.float16:
        big = torch.finfo(torch.float16).max
        if bool((payload.abs() > big).any()) and bool(torch.isfinite(payload).all()):
            raise ValueError(f"{what}: a value beyond fp16's range (|x| > {big:g}) would be sent "
                             f"as inf; use --wire-dtype bf16 or fp32")
    return out


def matched_cls_refusal(count_bias: str, model_type: str) -> str:
    """Why rows matched at the [CLS] query cannot run on this model type in `prism run`."""
    return (f"count_bias {count_bias!r}: rows matched at the [CLS] query run in prism run only for models "
            "whose attention has separate query / key / value projections and unrotated keys (BERT, "
            f"RoBERTa, ViT, DINOv2); use count_bias 'matched' or 'log' for model_type {model_type!r}")


# ------------------------------------------------------------------------------------------
# faults (tests only): PRISM_FAULT="die:rank=1:layer=1" or "stall:rank=1:layer=0:seconds=60",
# or "slow:rank=1:seconds=0.01" (a slower device: that long more in every layer)

def _maybe_fault(rank: int, layer: int):
    spec = os.environ.get("PRISM_FAULT", "")
    if not spec:
        return
    kind, *kvs = spec.split(":")
    d = dict(kv.split("=") for kv in kvs)
    if kind == "slow":
        if int(d.get("rank", 1)) == rank:
            time.sleep(float(d.get("seconds", 0.01)))
        return
    if int(d.get("rank", 1)) == rank and int(d.get("layer", 0)) == layer:
        import sys
        sys.stderr.write(f"PRISM_FAULT {kind} rank {rank} layer {layer} at {time.time():.3f}\n")
        sys.stderr.flush()
        if kind == "die":
            os._exit(17)
        if kind == "stall":
            time.sleep(float(d.get("seconds", 3600)))


# ------------------------------------------------------------------------------------------

# the layer's projections whose outputs build matched rows (LayerCtx.projection_ready)
_PROJECTIONS = {"q": "query_proj", "k": "key_proj", "v": "value_proj"}


class LayerCtx:
    """What the attention function needs for one layer on one rank."""

    def __init__(self, rt: "Runtime", layer):
        self.rt, self.layer = rt, layer
        self.causal = rt.entry.causal
        self.q_pos = rt.q_pos
        self.overlap = rt.cfg.overlap
        self.pending = None
        self.pending_first = None     # matched_cls: the first token's query in flight
        self.attn_input = None
        self.proj = {}                # matched rows: this layer's own q / k / v outputs (projection_ready)
        # attention_input means are taken inside the attention; the others before the block
        self.exchange_in_attention = rt.cfg.mode == "prism" and rt.averaging == "attention_input"

    # -- exchange ---------------------------------------------------------------------
    def start_block_exchange(self, h: torch.Tensor):
        rt = self.rt
        self._start(h if rt.cfg.mode == "voltage" else rt.means(h))

    def start_attention_exchange(self, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                                 q: Optional[torch.Tensor] = None, scale: Optional[float] = None):
        """Means of K and V (wire "kv", inside the attention) or of the attention input
        (wire "hidden", from the pre-hook before the projections; with data-dependent
        segments from inside the attention, by the segments chosen from the keys), or
        the rows matched at the mean query q (wire "matched", inside the attention)."""
        rt = self.rt
        if rt.matched:
            self._start_matched(q, k, v, scale)
        elif rt.send_counts:
            self._start_dynamic(k, v)
        elif rt.wire == "kv":
            self._start(torch.stack([rt.means(k), rt.means(v)], dim=1))  # [B, 2, Hkv, m, d]
        else:
            self._start(rt.means(self.attn_input))                        # [B, m, D]

    def _start_dynamic(self, k, v):
        """This layer's segments from the rank's own keys k [B, Hkv, n, d] (rotated for
        rotary models), their means and counts."""
        B, Hkv, n, d = k.shape
        rows = lambda t: t.transpose(1, 2).reshape(B, n, -1)
        self._start_dynamic_rows(rows(k), None if v is None else rows(v), Hkv)

    def start_from_keys(self, k3: torch.Tensor):
        """Start this layer's attention-input means with segments chosen from the keys from the
        key projection's output k3 [B, n, Hkv*d] (non-rotary models): the transfer then overlaps
        the value projection and the local attention, not only the latter."""
        if self.pending is not None or not self.exchange_in_attention or self.attn_input is None:
            return
        if self.rt.send_counts and self.rt.wire == "hidden":
            self._start_dynamic_rows(k3, None, None)

    def projection_ready(self, which: str, out: torch.Tensor):
        """Matched rows from the layer's own projections (separate q / k / v Linears, unrotated
        keys: Runtime.early_matched): `which` ("q", "k" or "v") has produced out [B, n, width].
        Once all three exist (after the value projection) the rows leave, before the
        attention runs: their values are the weighted sums of the rank's own values, so no
        weight matrix is read a second time (rows built before the values would need the value
        weights once more per head). matched_cls: the first token's query leaves rank 0 as soon
        as the query projection has run (start_first_token)."""
        rt = self.rt
        self.proj[which] = out
        if which == "q" and rt.at_first and self.pending_first is None:
            self.start_first_token(out)
        if self.pending is None and rt.receivers and len(self.proj) == 3:
            q3 = self.proj["q"]
            d = rt.entry.head_dim(rt.model.config)
            self._send_matched(q3, self.proj["k"], self.proj["v"], q3.shape[-1] // d, d, self.layer.attention.scaling)

    def _start_matched(self, q, k, v, scale):
        """This layer's segments chosen from the keys, summarised at the partition's mean
        query (hf/matched_summary.py, as the simulation does): per row and KV head the
        weighted key and value and the bias, [B, Hkv, m, 2d + 1] (the bias last). From
        inside the attention, for layers whose projections are not separate Linears."""
        if not self.rt.receivers:
            self._start(None)
            return
        B, H, n, d = q.shape
        rows = lambda t: t.transpose(1, 2).reshape(B, n, -1)
        s = scale if scale is not None else d ** -0.5          # the attention's own scale
        self._send_matched(rows(q), rows(k), rows(v), H, d, s)

    def _first_query(self, q3: torch.Tensor) -> torch.Tensor:
        """matched_cls: the first token's query [B, 1, H*d]: rank 0's own row of its queries
        q3, on the other ranks the one received from rank 0 (start_first_token)."""
        if self.rt.rank == 0:
            return q3[:, :1]
        return self.pending_first.wait()[0]

    def start_first_token(self, q3: torch.Tensor):
        """matched_cls: rank 0 sends the first token's query q3[:, :1] [B, 1, H*d] (in the
        compute dtype: it weights rows, it is not one) to every rank that builds rows; those
        post its receive. Started from the query projection's hook: it arrives while the
        receiver projects its own keys and values."""
        rt = self.rt
        if rt.rank == 0:
            send, recv = {j: q3[:, :1].contiguous() for j in rt.first_receivers}, {}
        elif rt.receivers:
            send, recv = {}, {0: torch.empty(q3.shape[0], 1, q3.shape[-1], dtype=q3.dtype)}
        else:
            return
        if send or recv:
            self.pending_first = rt.comm.start(f"layer {self.layer.index} first-token exchange", "layer",
                                               self.layer.index, send, recv)

    def segments(self, k3):
        """This rank's (seg_of [B, n], counts [B, m]) for keys k3 [B, n, F]: chosen from the
        keys, or the plan's when they leave no choice (found once; any keys give them)."""
        rt = self.rt
        if rt.chooses:
            return dynamic.partition_segments(rt.cfg.prism, k3, rt.part, rt.fixed, rt.grid)
        if rt._plan_segments is None or rt._plan_segments[0].shape[0] != k3.shape[0]:
            rt._plan_segments = dynamic.partition_segments(rt.cfg.prism, k3.new_zeros(k3.shape[0], k3.shape[1], 1),
                                                           rt.part, rt.fixed, rt.grid)
        return rt._plan_segments

    def _send_matched(self, q3, k3, v3, H, d, s):
        """The rows of this rank's queries / keys / values q3, k3, v3 [B, n, width], matched at
        their mean query or, for matched_cls, at the first token's."""
        rt = self.rt
        B, n, F = k3.shape
        Hkv = F // d
        seg_of, counts = self.segments(k3)
        q_at = self._first_query(q3) if rt.at_first else q3        # (else its mean is taken)
        km, vm, b = matched_summary(q_at, k3, v3, seg_of, counts, H, s, *rt.matched)
        self._post_matched(km, vm, b, Hkv, d)

    def _post_matched(self, km, vm, b, Hkv, d):
        """Rows [B, m, Hkv*d] and biases [B, m, Hkv] -> one message [B, Hkv, m, 2d + 1]."""
        B, m = b.shape[:2]
        heads = lambda t: t.reshape(B, m, Hkv, d).transpose(1, 2)
        self._start(torch.cat([heads(km), heads(vm), b.transpose(1, 2).unsqueeze(-1).to(km.dtype)], -1))

    def _start_dynamic_rows(self, k3, v3, Hkv):
        rt = self.rt
        if not rt.receivers:
            self._start(None)
            return
        B, n, F = k3.shape
        seg_of, counts = dynamic.partition_segments(rt.cfg.prism, k3, rt.part, rt.fixed, rt.grid)
        m = counts.shape[1]
        if rt.wire == "kv":
            heads = lambda t: t.view(B, m, Hkv, F // Hkv).transpose(1, 2)
            payload = torch.stack([heads(dynamic.means(k3, seg_of, counts)),
                                   heads(dynamic.means(v3, seg_of, counts))], dim=1)
        else:
            payload = dynamic.means(self.attn_input, seg_of, counts)
        self._start(payload, counts)

    def _start(self, payload, counts: Optional[torch.Tensor] = None):
        rt = self.rt
        if rt.receivers:
            t0 = time.perf_counter()
            payload = to_wire(payload, rt.wire_dtype, f"layer {self.layer.index} exchange")
            if counts is not None:      # one message: the int32 counts, then the rows, as bytes
                payload = torch.cat([counts.to(torch.int32).reshape(-1).view(torch.uint8),
                                     payload.contiguous().reshape(-1).view(torch.uint8)])
            rt.comm.post_s += time.perf_counter() - t0
        send = {p: payload for p in rt.receivers}
        recv = {j: rt.recv_buffer(j) for j in rt.sources}
        self.pending = rt.comm.start(f"layer {self.layer.index} exchange", "layer", self.layer.index, send, recv)

    def receive_kv(self, dtype):
        """Wait for this layer's rows; (k, v, counts, positions, bias) of all received
        keys: bias [B, Hkv, R] is the matched rows' score bias (their counts then 1), else None."""
        rt, layer = self.rt, self.layer
        if self.pending_first is not None and rt.rank == 0:
            self.pending_first.wait()     # rank 0's first-token sends must complete too
        if not rt.sources:
            if self.pending is not None:
                self.pending.wait()       # our sends must complete too
            return None
        got = self.pending.wait()
        ks, vs, cs, bs = [], [], [], []
        for j in rt.sources:
            t = got[j]
            if rt.src_counts[j]:                       # counts [B, m_j], then the rows
                c, t = rt.unpack(j, t)
                cs.append(c)
            else:                                      # the plan's
                cs.append(rt.plan_counts[j].expand(self.rt.batch, -1))
            t = t.to(rt.compute_dtype)                 # back from the wire dtype
            if rt.wire == "matched":
                d = (t.shape[-1] - 1) // 2
                k, v = t[..., :d], t[..., d:2 * d]
                bs.append(t[..., 2 * d])
            elif rt.wire == "kv":
                k, v = t[:, 0], t[:, 1]
            elif self.exchange_in_attention:           # attention-input means: project
                k, v = layer.kv(t)
            else:                                      # block input rows (means or Voltage's full rows)
                k, v = layer.kv(layer.pre_norm(t) if layer.pre_norm is not None else t)
                if layer.rotary:
                    k = apply_rotary(k, *rt.rotation(j, t))
            ks.append(k)
            vs.append(v)
        # [B, R] per sequence when some source chose its segments, else the plan's [R]
        counts = torch.cat(cs, 1) if any(rt.src_counts[j] for j in rt.sources) else rt.remote_counts
        bias = torch.cat(bs, 2) if bs else None
        if bias is not None:            # the bias stands for the count
            counts = torch.ones_like(counts)
        return (torch.cat(ks, 2).to(dtype), torch.cat(vs, 2).to(dtype), counts, rt.remote_pos, bias)


class Runtime:
    """One rank's state for one model, one input length and one configuration."""

    def __init__(self, model, comm: Comm, cfg: RunConfig, n_tokens: int, batch: int = 1,
                 input_shape=None, input_dtype: Optional[torch.dtype] = None):
        """input_shape / input_dtype: of the whole raw input (rank 0's, told in the
        handshake); every rank needs them in raw mode to size what it receives."""
        self.model, self.entry, self.comm, self.cfg = model, lookup(model), comm, cfg
        self.input_shape = None if input_shape is None else tuple(int(x) for x in input_shape)
        self.input_dtype = input_dtype
        self.rank, self.world = comm.rank, comm.world
        self.batch = batch
        self.averaging = cfg.averaging
        bias = cfg.prism.bias_for(self.entry.causal, self.entry.roles(model.config)) if cfg.mode == "prism" else "log"
        self.wire = None if cfg.mode == "single" else wire_format(model.config, cfg.mode, self.averaging, bias)
        # matched rows (hf/matched_summary.py): (gamma, shared), else None; at_first: matched at
        # the first token's ([CLS]) query, which rank 0 holds and sends the others in every layer
        self.matched = MATCHED.get(bias)
        self.at_first = bias in MATCHED_AT_FIRST_TOKEN
        self.count_bias = bias
        self.wire_dtype = wire_torch_dtype(cfg.wire_dtype)
        self.compute_dtype = next(model.parameters()).dtype
        self.n_tokens = n_tokens
        self.layers = self.entry.layers(model)
        # the model's special tokens and patch grid decide anchors and segment shapes
        self.plan = cfg.plan(n_tokens, self.world, self.entry.causal, self.entry.roles(model.config))
        self._rotations = {}
        if self.plan is not None:
            dev = self.plan.device(self.rank)
            self.part = self.plan.partitions[self.rank]
            self.sources = list(dev.sources)
            self.receivers = list(self.plan.receivers(self.rank))
            self.q_pos = torch.tensor(dev.query_positions, dtype=torch.int64)
            self.remote_counts = torch.tensor(dev.counts[dev.size:], dtype=torch.int64)
            self.remote_pos = torch.tensor(dev.key_positions[dev.size:], dtype=torch.int64)
            # data-dependent segments: the static anchors this rank keeps alone, the patch grid, and
            # which partitions choose their segments from their keys (their counts travel too)
            self.fixed, self.grid, self.anchors = (), None, ()
            self.src_counts = {j: False for j in range(len(self.plan.partitions))}
            if cfg.dynamic:
                self.anchors, self.grid = resolve(n_tokens, self.entry.roles(model.config), cfg.prism.anchors,
                                                  cfg.prism.segments)
                self.fixed = dynamic.fixed_anchors(self.part, self.anchors)
                self.src_counts = {j: dynamic.chooses(cfg.prism, p, dynamic.fixed_anchors(p, self.anchors), self.grid)
                                   for j, p in enumerate(self.plan.partitions)}
            # whether this rank's segments depend on its keys (else they are the plan's, the same
            # in every layer: LayerCtx.segments finds them once)
            self.chooses, self._plan_segments = self.src_counts[self.rank], None
            if self.matched:        # a bias per row and head travels instead of the counts
                self.src_counts = {j: False for j in self.src_counts}
            self.send_counts = self.src_counts[self.rank]
            self.plan_counts = {j: torch.tensor(p.counts, dtype=torch.int64) for j, p in enumerate(self.plan.partitions)}
            # matched_cls: the ranks that build rows and need rank 0's first token for it
            self.first_receivers = [j for j in range(1, self.world) if self.plan.receivers(j)] \
                if self.at_first else []
            if cfg.input in ("raw", "local") and self.rank != 0 and (self.input_shape is None or self.input_dtype is None):
                raise ValueError(f"input {cfg.input!r}: ranks other than 0 need the input's shape and dtype")
        self._capture_hooks, self._key_hooks, self._proj_hooks = [], [], []
        if cfg.mode == "prism" and self.averaging == "attention_input" and self.wire == "hidden":
            for layer in self.layers:
                self._capture_hooks.append(layer.attention.register_forward_pre_hook(self._capture, with_kwargs=True))
                # segments chosen from the keys: start as soon as the keys exist
                if self.plan is not None and self.send_counts and layer.key_proj is not None and not layer.rotary:
                    self._key_hooks.append(layer.key_proj.register_forward_hook(self._keys_ready))
        elif self.matched and self.at_first and not all(self.early_matched(layer) for layer in self.layers):
            raise ValueError(matched_cls_refusal(bias, self.entry.model_type))
        elif self.matched and (self.receivers or self.first_receivers):
            # matched rows leave from the value projection's hook where the layer has separate
            # q / k / v projections and unrotated keys (LayerCtx.projection_ready), else from
            # inside the attention. Two earlier starting points cost more compute
            # (docs/distributed.md): from the key projection, with the values' rows projected
            # per head from weighted attention inputs (the value weights read twice), and from
            # the attention input before any projection (the three weight matrices read cold).
            for layer in self.layers:
                if self.early_matched(layer):
                    for which, name in _PROJECTIONS.items():
                        self._proj_hooks.append(getattr(layer, name).register_forward_hook(
                            functools.partial(self._projection_ready, which)))

    def close(self):
        """Remove the hooks this runtime put on the model (before another runtime, e.g. with
        new partition sizes, takes it over)."""
        for h in self._capture_hooks + self._key_hooks + self._proj_hooks:
            h.remove()
        self._capture_hooks, self._key_hooks, self._proj_hooks = [], [], []

    @staticmethod
    def early_matched(layer) -> bool:
        """Whether this layer's matched rows can leave before its attention runs: separate q / k / v
        Linears, unrotated keys, and the attention's score scale known before it runs."""
        return (layer.key_proj is not None and layer.query_proj is not None and layer.value_proj is not None
                and not layer.rotary and isinstance(getattr(layer.attention, "scaling", None), float))

    @staticmethod
    def _capture(module, args, kwargs):
        ctx = overlap.current()
        if ctx is not None:
            ctx.attn_input = args[0] if args else kwargs["hidden_states"]
            # send the means now, before the Q/K/V projections: the transfer then overlaps
            # them as well as the local attention (once: another Runtime of the same model
            # may have left its hook too)
            # (segments chosen from the keys start inside the attention, once the keys exist)
            if isinstance(ctx, LayerCtx) and ctx.exchange_in_attention and ctx.rt.wire == "hidden" \
                    and not ctx.rt.send_counts and ctx.pending is None:   # not while decoding (DecodeCtx)
                ctx.start_attention_exchange()

    @staticmethod
    def _projection_ready(which, module, args, out):
        ctx = overlap.current()
        # this layer's own projection (not a DecodeCtx's, nor another layer's)
        if isinstance(ctx, LayerCtx) and getattr(ctx.layer, _PROJECTIONS[which]) is module:
            ctx.projection_ready(which, out)

    @staticmethod
    def _keys_ready(module, args, out):
        ctx = overlap.current()
        # this layer's own key projection (not the received means' projection in receive_kv,
        # which runs once the exchange is pending, nor a DecodeCtx's)
        if isinstance(ctx, LayerCtx) and ctx.layer.key_proj is module:
            ctx.start_from_keys(out)

    def means(self, x: torch.Tensor) -> torch.Tensor:
        """Segment means of this rank's rows of x (along dim -2), as the plan says."""
        return partition_means(x, self.part, backend=self.cfg.prism.backend if self.cfg.prism else "auto")[0]

    def rotation(self, j: int, like: torch.Tensor):
        """(cos, sin) of partition j's received rows: per token in Voltage, the
        segment's average rotation (mean cos, mean sin) for block_input means."""
        if j not in self._rotations:
            part = self.plan.partitions[j]
            cos, sin = self.entry.cos_sin(self.model, torch.tensor(part.tokens), like)
            if self.cfg.mode == "prism":
                cos, sin = partition_means(cos, part)[0], partition_means(sin, part)[0]
            self._rotations[j] = (cos, sin)
        return self._rotations[j]

    def _rows_shape(self, j: int):
        rows = self.plan.means[j]              # = the partition's size in Voltage (CR = 1)
        c, e = self.model.config, self.entry
        if self.wire == "matched":
            return (self.batch, e.num_kv_heads(c), rows, 2 * e.head_dim(c) + 1)
        if self.wire == "kv":
            return (self.batch, 2, e.num_kv_heads(c), rows, e.head_dim(c))
        return (self.batch, rows, c.hidden_size)

    def recv_buffer(self, j: int) -> torch.Tensor:
        shape = self._rows_shape(j)
        if not self.src_counts[j]:
            return torch.empty(shape, dtype=self.wire_dtype)
        numel = 1
        for x in shape:
            numel *= x
        itemsize = torch.empty((), dtype=self.wire_dtype).element_size()
        return torch.empty(self.batch * self.plan.means[j] * COUNT_BYTES + numel * itemsize, dtype=torch.uint8)

    def unpack(self, j: int, buf: torch.Tensor):
        """A data-dependent message from rank j -> (counts [B, m_j] int64, rows in the wire dtype)."""
        m = self.plan.means[j]
        nc = self.batch * m * COUNT_BYTES
        counts = buf[:nc].view(torch.int32).view(self.batch, m).to(torch.int64)
        return counts, buf[nc:].view(self.wire_dtype).view(self._rows_shape(j))

    def token_range(self, j: int):
        o = self.plan.offsets[j]
        return o, o + self.plan.sizes[j]

    def raw_slice_index(self, j: int, shape):
        """(dim, begin, end) of the raw input rank j embeds."""
        return self.entry.input_slice(self.model.config, shape, *self.token_range(j))

    def expected_startup_bytes(self) -> int:
        """Cost model of what this rank receives before the first layer."""
        if self.plan is None:
            return 0
        if self.cfg.input in ("hidden", "local"):
            return startup_bytes(self.model.config, self.plan.sizes, self.cfg.input, batch=self.batch)[self.rank]
        dt = str(self.input_dtype).replace("torch.", "")
        name = {"int64": "int64", "int32": "int32", "float32": "fp32", "float16": "fp16",
                "bfloat16": "bf16", "uint8": "uint8"}.get(dt)
        if name is None:
            raise ValueError(f"no cost-model entry for an input of dtype {self.input_dtype}")
        return startup_bytes(self.model.config, self.plan.sizes, "raw", input_bytes=INPUT_DTYPE_BYTES[name],
                             batch=self.batch)[self.rank]

    def _embed_own(self, inputs):
        """This rank's rows, embedded from its slice of the whole input `inputs`."""
        shape = tuple(inputs.shape)
        d, a, b = self.raw_slice_index(self.rank, shape)
        return self.entry.embed_slice(self.model, inputs.narrow(d, a, b - a), *self.token_range(self.rank),
                                      shape).contiguous()

    def _start_raw(self, inputs):
        """Raw start-up: each rank embeds its own tokens from its slice of the input."""
        e, m, rank = self.entry, self.model, self.rank
        if rank == 0:
            shape = tuple(inputs.shape)
            send = {}
            for j in range(1, self.world):
                d, a, b = self.raw_slice_index(j, shape)
                if b > a:                   # a rank with no pixels to embed ([CLS] only) gets nothing
                    send[j] = inputs.narrow(d, a, b - a).contiguous()
            pend = self.comm.start("scatter of the raw input", "scatter", 0, send, {})
            h = self._embed_own(inputs)
            pend.wait()
            return h
        shape = self.input_shape
        d, a, b = self.raw_slice_index(rank, shape)
        buf_shape = list(shape)
        buf_shape[d] = b - a
        buf = torch.empty(buf_shape, dtype=self.input_dtype)
        if b > a:
            buf = self.comm.start("scatter of the raw input", "scatter", 0, {}, {0: buf}).wait()[0]
        return e.embed_slice(m, buf, *self.token_range(rank), shape).contiguous()

    def expected_layer_bytes(self) -> int:
        counted = sum(self.plan.means[j] for j in self.sources if self.src_counts[j])
        return expected_recv_bytes(self.plan, self.model.config, self.wire, self.rank, self.batch,
                                   self.cfg.wire_dtype, counted_rows=counted, count_bias=self.count_bias,
                                   compute_bytes=self.compute_dtype.itemsize)

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: Optional[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """One inference. `inputs` on rank 0 (ignored elsewhere). Returns on rank 0
        {"head": model output, "hidden": final-normed hidden rows (all when gathered)}."""
        e, m, cfg = self.entry, self.model, self.cfg
        if cfg.mode == "single":
            if self.rank != 0:
                return None
            hidden, head = e.stock_forward(m, inputs)
            return {"head": head, "hidden": hidden}
        rank, plan = self.rank, self.plan
        D = m.config.hidden_size
        h = self.run_blocks(inputs)
        # 3. final norm and gather
        h = e.final_norm(m, h)
        if not (e.causal or cfg.gather == "all"):
            return {"head": e.head(m, h[:, :1]), "hidden": h} if rank == 0 else None
        if rank != 0:
            self.comm.start("gather of the outputs", "gather", 0, {0: h}, {}).wait()
            return None
        bufs = {j: torch.empty(self.batch, plan.sizes[j], D) for j in range(1, self.world)}
        got = self.comm.start("gather of the outputs", "gather", 0, {}, bufs).wait()
        full = torch.cat([h] + [got[j] for j in range(1, self.world)], dim=1)
        return {"head": e.head(m, full) if e.causal else e.head(m, full[:, :1]), "hidden": full}

    def run_blocks(self, inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """Start-up and every block with its exchange: this rank's rows after the last
        block (before the final norm). Shared by forward and `prism generate`'s prefill."""
        e, m, cfg = self.entry, self.model, self.cfg
        rank, plan = self.rank, self.plan
        D = m.config.hidden_size
        # 1. raw: every rank embeds its slice of the input, sent by the master; local: of
        #    its own copy; hidden: the master embeds and scatters
        if cfg.input == "raw":
            h = self._start_raw(inputs)
        elif cfg.input == "local":
            if inputs is None:
                raise ValueError(f"input 'local': rank {rank} holds no input")
            h = self._embed_own(inputs)
        elif rank == 0:
            parts = torch.split(e.embed(m, inputs), list(plan.sizes), dim=1)
            pend = self.comm.start("scatter of the partitions", "scatter", 0,
                                   {j: parts[j] for j in range(1, self.world)}, {})
            h = parts[0].contiguous()
            pend.wait()
        else:
            buf = torch.empty(self.batch, plan.sizes[rank], D)
            h = self.comm.start("scatter of the partitions", "scatter", 0, {}, {0: buf}).wait()[0]
        # 2. blocks; each layer's own compute (its time less waiting and posting) is kept
        #    for --rebalance, which takes the median over layers (robust to one stalled layer)
        self.layer_compute_s = []
        for layer in self.layers:
            t0, w0, p0 = time.perf_counter(), self.comm.wait_s, self.comm.post_s
            _maybe_fault(rank, layer.index)
            ctx = LayerCtx(self, layer)
            if not ctx.exchange_in_attention:
                ctx.start_block_exchange(h)
            with overlap.use_layer(ctx):
                h = e.run_block(m, layer.block, h, self.q_pos)
            if ctx.pending is None:
                raise RuntimeError(f"layer {layer.index}: the attention function did not run "
                                   f"(wrong attn implementation?)")
            self.layer_compute_s.append(time.perf_counter() - t0 - (self.comm.wait_s - w0)
                                        - (self.comm.post_s - p0))
        return h

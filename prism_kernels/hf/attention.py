"""Prism attention for Hugging Face models: P devices simulated in one process.

transformers calls `prism_attention_forward(module, query, key, value,
attention_mask, scaling=..., ...)` with the projections of the *whole* batch
(query [B, H, N, d], key/value [B, Hkv, N, d], rotary already applied).
`simulate_prism` turns that into what P devices would compute
(docs/method.md, "Partitions", "Segment means", "Scaling-aware attention",
"Causal mask"):

  1. sequences of one real length form a group with one segment plan,
     `PrismConfig.plan(L, causal, roles)` (roles: the model's special tokens and
     patch grid, attached by enable_prism; positions count real tokens only, so
     [SEP] is the last real token of a padded row);
  2. per group and partition, the averaging strategy attached by enable_prism
     (hf/averaging.py) gives the K/V segment means (`plan.partition_means`);
  3. every device of every sequence becomes one row of a stacked batch: its own
     tokens as queries, keys/values = own rows followed by the means of the
     partitions it receives from (in causal models only earlier ones), with the
     plan's counts and positions;
  4. ONE prism_kernels.prism_attention call per layer (scaling-aware softmax,
     partition-aware causal mask by global positions);
  5. each device's query rows are written back to their tokens.

The index tensors of steps 3 and 5 depend only on the padding mask, the shape
and the settings, so they are built once per forward (`Layout`, reused by the
next layers while those stay the same) and every layer does a fixed number of
index_select calls, whatever the padding.

Padding (the method does not cover it; this is the choice made here): a padded
token is not a token. Each sequence's real tokens (order kept) are partitioned
on their own, so a padded batch gives every sequence exactly what it would get
alone. Pads never enter a mean, never serve as keys, and their output rows are
zeros. A sequence with fewer real tokens than P runs on as many devices as it
has tokens. Devices with fewer queries or keys than the longest get padding
slots made invisible through positions (prism_attention has no mask argument:
with causal=True a key at position BIG+1 is seen by no query and a query at -1
sees nothing; non-causal models then use q_pos = BIG for every real query and
k_pos = 0 for every real key).

Generation (hf/generation.py): when the keys given are a PrismCache layer's, the
prefill runs the simulation above and keeps the last device's rows in the cache, and
a decode step attends the cache with its counts and positions (_with_cache).

torch.compile: without padding (attention_mask=None) the layout depends on the
shape and settings only; under compilation it is built inside the traced graph
from Python ints (plans from shapes, no tensor value read, no per-call cache
object for dynamo to guard on), so `torch.compile(model, fullgraph=True)` traces
the whole forward and inputs of the same shape reuse the graph. With a padding
mask the groups and plans depend on the mask's values: each layer's Prism
attention then runs eagerly (`torch.compiler.disable`, one clean graph break per
layer; fullgraph=True refuses padded inputs). A plan is Python on concrete sizes:
when input shapes vary, compile with dynamic=False (one graph per shape; with
dynamo's automatic dynamic shapes the second shape fails inside the plan).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..anchors import TokenRoles, resolve
from .. import dynamic as dyn
from ..api import prism_attention
from ..config import PrismConfig
from ..costs.comm import MATCHED_AT_FIRST_TOKEN, wire_torch_dtype
from ..plan import Partition, PrismPlan
from .averaging import ATTENTION_INPUT
from .masks import key_valid_from_mask
from .matched_summary import MATCHED, augment_bias, matched_summary
from .spread_bias import augment, segment_key_spread

BIG = 1 << 40  # a position beyond any real token

@dataclass
class Group:
    """Sequences of one real length L and their plan.

    tokens [Bg, L]: flat indices b * N + t of each row's real tokens, in order.
    span (b0, b1, s): set when the group is rows b0:b1 with real tokens s:s+L, so
    its tensors are views (same-length batches, one-row groups of right or left
    padding). bank: partition j -> its first row in the layer's stack of means
    (groups in order, then partitions).
    """
    rows: torch.Tensor
    L: int
    tokens: torch.Tensor
    span: Optional[Tuple[int, int, int]]
    plan: PrismPlan
    bank: Dict[int, int]
    anchors: Tuple[int, ...] = ()    # the policy's static anchors (data-dependent policies only)
    grid: Optional[Tuple[int, int, int]] = None     # and its patch grid

    def fixed(self, part: Partition) -> Tuple[int, ...]:
        """Local indices of the anchors the plan keeps alone in this partition."""
        return dyn.fixed_anchors(part, self.anchors)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def sent(self) -> List[Partition]:
        """Partitions whose means some device receives, in bank order."""
        return [self.plan.partitions[j] for j in self.bank]

    def take(self, x: torch.Tensor, part: Partition) -> torch.Tensor:
        """The partition's rows of x [B, N, F] (local order): [Bg, n_j, F]."""
        o, n = part.offset, part.size
        if self.span is not None:
            b0, b1, s = self.span
            return x[b0:b1, s + o:s + o + n]
        idx = self.tokens[:, o:o + n].reshape(-1)
        return x.reshape(-1, x.shape[-1]).index_select(0, idx).view(self.size, n, x.shape[-1])


@dataclass
class Layout:
    """Index tensors of one forward: the stacked batch of devices (rows) and slots."""
    B: int
    N: int
    groups: List[Group]
    q_index: torch.Tensor            # [R * nq] flat token of each query slot (pads: 0)
    kv_index: torch.Tensor           # [R * nk] row of [tokens ; means bank] of each key slot
    counts: torch.Tensor             # [R, nk]
    q_pos: Optional[torch.Tensor]    # [R, nq] or None when no slot is padding and not causal
    k_pos: Optional[torch.Tensor]
    out_src: torch.Tensor            # query slots holding real tokens
    out_dst: torch.Tensor            # their flat tokens
    inverse: Optional[torch.Tensor]  # slot of every token when all tokens are real, else None

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """[R * nq, ...] per slot -> [B * N, ...] per token, zeros for pads."""
        if self.inverse is not None:
            return out.index_select(0, self.inverse)
        res = out.new_zeros((self.B * self.N,) + tuple(out.shape[1:]))
        return res.index_copy_(0, self.out_dst, out.index_select(0, self.out_src))


def _groups(key_valid, B, N, config, causal, device, roles) -> List[Group]:
    if key_valid is None:
        # from the shape alone (no tensor values read: torch.compile traces this path)
        rows = torch.arange(B)
        plan = config.plan(N, causal, roles=roles, static=True)
        bank, acc = {}, 0
        for j in sorted({s for d in plan.devices for s in d.sources}):
            bank[j] = acc
            acc += B * plan.partitions[j].num_segments
        tokens = (rows[:, None] * N + torch.arange(N)).to(device)
        anchors, grid = resolve(N, roles, config.anchors, config.segments) if config.dynamic else ((), None)
        return [Group(rows, N, tokens, (0, B, 0), plan, bank, anchors, grid)]
    else:
        kv = key_valid.to("cpu", torch.bool)
        lengths = kv.sum(-1)
        spec = []
        for L in sorted(set(lengths.tolist()), reverse=True):
            if L == 0:        # an all-padding row has nothing to compute: its output stays zero
                continue
            rows = (lengths == L).nonzero().flatten()
            spec.append((rows, kv[rows].nonzero()[:, 1].view(len(rows), L)))
    groups, acc = [], 0
    for rows, tok in spec:
        Bg, L = tok.shape
        span = None
        if (int(rows[-1]) - int(rows[0]) + 1 == Bg and int(tok[0, -1]) - int(tok[0, 0]) + 1 == L
                and bool((tok == tok[0]).all())):
            span = (int(rows[0]), int(rows[-1]) + 1, int(tok[0, 0]))
        plan = config.plan(L, causal, roles=roles, static=True)
        bank = {}
        for j in sorted({s for d in plan.devices for s in d.sources}):
            bank[j] = acc
            acc += Bg * plan.partitions[j].num_segments
        anchors, grid = resolve(L, roles, config.anchors, config.segments) if config.dynamic else ((), None)
        groups.append(Group(rows, L, (rows[:, None] * N + tok).to(device), span, plan, bank, anchors, grid))
    return groups


def build_layout(key_valid: Optional[torch.Tensor], B: int, N: int, config: PrismConfig,
                 causal: bool, device, roles: Optional[TokenRoles] = None) -> Layout:
    groups = _groups(key_valid, B, N, config, causal, device, roles)
    devs = [(g, d) for g in groups for d in g.plan.devices]
    nq = max([d.size for _, d in devs] or [1])          # (no max(default=): torch.compile traces this)
    nk = max([d.num_keys for _, d in devs] or [1])
    ragged = any(d.size != nq or d.num_keys != nk for _, d in devs)
    use_pos = causal or ragged
    R = sum(g.size for g, _ in devs)
    i64 = dict(dtype=torch.int64, device=device)
    q_index, kv_index = torch.zeros(R, nq, **i64), torch.zeros(R, nk, **i64)
    counts = torch.ones(R, nk, **i64)
    q_pos, k_pos = torch.full((R, nq), -1, **i64), torch.full((R, nk), BIG + 1, **i64)
    src, dst = [], []
    bank0 = B * N                       # the means bank follows the B * N token rows
    r0 = 0
    for g, d in devs:
        r1 = r0 + g.size
        own = g.tokens[:, d.offset:d.offset + d.size]
        q_index[r0:r1, :d.size] = own
        kv_index[r0:r1, :d.size] = own
        col = d.size
        for j in d.sources:
            m = g.plan.partitions[j].num_segments
            first = bank0 + g.bank[j]
            kv_index[r0:r1, col:col + m] = (first + torch.arange(g.size, **i64)[:, None] * m
                                            + torch.arange(m, **i64))
            col += m
        counts[r0:r1, :d.num_keys] = torch.tensor(d.counts, **i64)
        q_pos[r0:r1, :d.size] = torch.tensor(d.query_positions, **i64) if causal else BIG
        k_pos[r0:r1, :d.num_keys] = torch.tensor(d.key_positions, **i64) if causal else 0
        src.append((torch.arange(r0, r1, **i64)[:, None] * nq + torch.arange(d.size, **i64)).reshape(-1))
        dst.append(own.reshape(-1))
        r0 = r1
    src = torch.cat(src) if src else torch.zeros(0, **i64)
    dst = torch.cat(dst) if dst else torch.zeros(0, **i64)
    inverse = None
    if key_valid is None:
        inverse = torch.empty_like(dst)
        inverse[dst] = src
    return Layout(B, N, groups, q_index.reshape(-1), kv_index.reshape(-1), counts,
                  q_pos if use_pos else None, k_pos if use_pos else None, src, dst, inverse)


_last_layout: list = [None]   # (signature, key_valid, Layout) of the last layer: one forward's layout


def layout_for(key_valid, B, N, config, causal, device, roles=None) -> Layout:
    """build_layout, cached while the shape, settings and padding stay the same (every
    layer of a forward; comparing the [B, N] padding masks costs next to nothing)."""
    if torch.compiler.is_compiling():
        # traced: the layout depends on shapes and settings only (padding never gets here,
        # see prism_attention_forward), so its index tensors are constants of the graph;
        # (a plan needs concrete sizes: compile with dynamic=False when shapes vary)
        return build_layout(key_valid, B, N, config, causal, device, roles)
    sig = (B, N, config, causal, str(device), roles)
    last = _last_layout[0]
    if (last is not None and last[0] == sig and (last[1] is None) == (key_valid is None)
            and (key_valid is None or torch.equal(last[1], key_valid))):
        return last[2]
    layout = build_layout(key_valid, B, N, config, causal, device, roles)
    _last_layout[0] = (sig, None if key_valid is None else key_valid.clone(), layout)
    return layout


@dataclass
class LayerInputs:
    """What an averaging strategy may read: the calling module, K and V as [B, N, Hkv * d]."""
    module: object
    key: torch.Tensor
    value: torch.Tensor
    backend: str


def simulate_prism(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, config: PrismConfig,
                   causal: bool, scale: Optional[float] = None, key_valid: Optional[torch.Tensor] = None,
                   averaging=None, module=None, layout: Optional[Layout] = None,
                   plans: Optional[list] = None, roles: Optional[TokenRoles] = None,
                   capture=None) -> torch.Tensor:
    """P simulated devices of one attention layer. Returns [B, N, H, d] (HF layout).

    query [B, H, N, d]; key, value [B, Hkv, N, d]; key_valid [B, N] bool or None.
    `averaging` (hf/averaging.py; default: means of K and V) gives each partition's
    K/V means. `roles`: the model's special tokens and patch grid (None: text). `plans`, when given a list, receives (group rows, PrismPlan) per group.
    `capture(layout, k_rows, v_rows, counts)`, when given, sees every device's key / value rows
    ([R * nk, Hkv * d], slot order of the layout) and their counts ([R, nk]: the layout's,
    or this layer's with data-dependent segments): generation keeps the last device's.
    """
    B, H, N, d = query.shape
    Hkv = key.shape[1]
    lay = layout or build_layout(key_valid, B, N, config, causal, query.device, roles)
    if plans is not None:
        plans.extend((g.rows, g.plan) for g in lay.groups)
    if not lay.groups:
        return query.new_zeros(B, N, H, d)
    k3 = key.transpose(1, 2).reshape(B, N, Hkv * d)
    v3 = value.transpose(1, 2).reshape(B, N, Hkv * d)
    inputs = LayerInputs(module, k3, v3, config.backend)
    # rows of [B * N tokens ; means bank], 2-D: index_select is much faster on 2-D than on [rows, H, d]
    ks, vs = [k3.reshape(B * N, -1)], [v3.reshape(B * N, -1)]
    bias = config.bias_for(causal, roles)
    spread = bias == "spread"
    s = scale if scale is not None else d ** -0.5
    matched = MATCHED.get(bias)                    # rows matched at a query: hf/matched_summary.py
    at_first = bias in MATCHED_AT_FIRST_TOKEN      # ... at the first token's ([CLS]) query
    extra = [k3.new_zeros(B * N, Hkv, dtype=torch.float32)] if spread or matched else None
    q3 = query.transpose(1, 2).reshape(B, N, H * d) if matched else None
    wire = None if config.wire_dtype == "fp32" else wire_torch_dtype(config.wire_dtype)
    counts = lay.counts
    bank_counts = [torch.ones(B * N, dtype=torch.int64, device=query.device)] if config.dynamic else None
    for g in lay.groups:
        # the query the rows are matched at: the sending partition's (its mean), or for
        # matched_cls the group's first token's, which partition 0 holds
        q_first = g.take(q3, g.plan.partitions[0])[:, :1] if at_first else None
        for part in g.sent():
            if config.dynamic:      # segments chosen from this layer's keys (prism_kernels/dynamic.py)
                kp = g.take(k3, part)
                seg_of, cnt = dyn.partition_segments(config, kp, part, g.fixed(part), g.grid)
                if matched:                     # matched rows: their bias replaces log c
                    q_at = q_first if at_first else g.take(q3, part)
                    km, vm, b = matched_summary(q_at, kp, g.take(v3, part), seg_of, cnt, H, s, *matched)
                    bank_counts.append(torch.ones_like(cnt).reshape(-1))
                    if wire is not None:        # the bias crosses the network with the rows
                        b = b.to(wire).to(torch.float32)
                    extra.append(b.reshape(-1, Hkv) / s)
                else:
                    km, vm = dyn.means(kp, seg_of, cnt), dyn.means(g.take(v3, part), seg_of, cnt)
                    bank_counts.append(cnt.reshape(-1))
            else:
                km, vm = (averaging or ATTENTION_INPUT).kv_means(inputs, g, part)
            if wire is not None:               # what crossed the network, rounded
                km, vm = km.to(wire), vm.to(wire)
            ks.append(km.reshape(-1, Hkv * d).to(key.dtype))
            vs.append(vm.reshape(-1, Hkv * d).to(value.dtype))
            if spread:
                extra.append(0.5 * s * segment_key_spread(k3, g, part, Hkv, config.backend))
    R, nq, nk = lay.rows, lay.q_index.numel() // lay.rows, lay.counts.shape[1]
    if config.dynamic:          # this layer's counts (padding slots read token row 0: count 1)
        counts = torch.cat(bank_counts).index_select(0, lay.kv_index).view(R, nk)
    stack = lambda parts: (torch.cat(parts) if len(parts) > 1 else parts[0]).index_select(0, lay.kv_index)
    q_all = query.transpose(1, 2).reshape(B * N, H * d).index_select(0, lay.q_index)
    k_all, v_all = stack(ks), stack(vs)
    if capture is not None:
        capture(lay, k_all, v_all, counts)
    heads = lambda t, n, h: t.view(R, n, h, d).transpose(1, 2)
    q4, k4, v4 = heads(q_all, nq, H), heads(k_all, nk, Hkv), heads(v_all, nk, Hkv)
    if spread:
        q4, k4, v4 = augment(q4, k4, v4, stack(extra).view(R, nk, Hkv).transpose(1, 2), s)
    elif matched:
        q4, k4, v4 = augment_bias(q4, k4, v4, stack(extra).view(R, nk, Hkv).transpose(1, 2))
    out = prism_attention(q4, k4, v4, key_counts=counts, causal=lay.q_pos is not None, q_pos=lay.q_pos,
                          k_pos=lay.k_pos, scale=s, backend=config.backend)[..., :d]
    return lay.restore(out.transpose(1, 2).reshape(R * nq, H * d)).view(B, N, H, d)


def get_prism_config(module) -> PrismConfig:
    cfg = getattr(module, "_prism_config", None)
    if cfg is None:
        cfg = getattr(getattr(module, "config", None), "prism", None)
    if cfg is None:
        raise ValueError(
            "attn_implementation='prism' needs Prism settings: call "
            "prism_kernels.hf.enable_prism(model, num_partitions=P, compression_rate=CR), or set "
            "config.prism = PrismConfig(...).to_dict() before building the model")
    return PrismConfig.from_any(cfg)


def get_token_roles(module) -> TokenRoles:
    """The roles attached by enable_prism, else (a model built with
    attn_implementation="prism") those of the module's model config."""
    roles = getattr(module, "_prism_roles", None)
    if roles is None:
        from ..models import token_roles
        roles = token_roles(getattr(module, "config", None))
    return roles


def prism_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers AttentionInterface entry "prism". Returns ([B, N, H, d], None)."""
    for unsupported in ("softcap", "sliding_window", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"prism attention does not support `{unsupported}`")
    config = get_prism_config(module)
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    holder = getattr(module, "_prism_generation", None)
    cache = holder["cache"] if holder is not None else None
    layer = cache.layer_of(module, key) if cache is not None else None
    if layer is not None:       # generation: a PrismCache holds this layer's keys (hf/generation.py)
        return _with_cache(cache, layer, module, query, key, value, attention_mask, config, scaling), None
    if Nq != Nk:
        raise NotImplementedError(
            f"prism attention simulates one forward over the whole sequence (queries == keys); got "
            f"{Nq} queries and {Nk} keys (a KV cache during generation?). Generate under "
            f"prism_kernels.hf.enable_prism (it supplies a PrismCache), or run with use_cache=False.")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    averaging = getattr(module, "_prism_averaging", None)
    if averaging is None and config.averaging != "attention_input":
        raise RuntimeError(f"averaging={config.averaging!r} needs the hooks installed by "
                           "prism_kernels.hf.enable_prism")
    plans = getattr(module, "_prism_plans", None)
    if attention_mask is not None and torch.compiler.is_compiling():
        # padding: the groups and plans depend on the mask's values, so under torch.compile
        # this layer's Prism attention runs eagerly (a graph break; fullgraph=True needs
        # unpadded inputs, attention_mask=None)
        out = _padded_eager(query, key, value, attention_mask, config, causal, scaling, averaging,
                            module, plans)
    else:
        out = _prism(query, key, value, attention_mask, config, causal, scaling, averaging, module, plans)
    return out, None


def _with_cache(cache, layer, module, query, key, value, attention_mask, config, scaling):
    """Prefill (the layer was empty): simulate the P devices, keep the last one's cache.
    Decode: the last device's queries against its cached rows plus the new ones."""
    from . import generation
    if not getattr(module, "is_causal", False):
        raise NotImplementedError("generation with a PrismCache needs a causal (decoder) attention layer")
    if layer.counts is not None:
        return generation.decode_step(layer, query, key, value, attention_mask, config, scaling)
    averaging = getattr(module, "_prism_averaging", None)
    B, Nk = query.shape[0], key.shape[2]
    key_valid = key_valid_from_mask(attention_mask, B, Nk)
    roles = get_token_roles(module)
    layout = layout_for(key_valid, B, Nk, config, True, query.device, roles)
    if not layout.groups:
        raise ValueError("prism generation: every prompt of the batch is empty (all padding)")
    seen = {}
    out = simulate_prism(query, key, value, config=config, causal=True, scale=scaling, key_valid=key_valid,
                         averaging=averaging, module=module, layout=layout, roles=roles,
                         plans=getattr(module, "_prism_plans", None),
                         capture=lambda lay, k, v, c: seen.update(lay=lay, k=k, v=v, c=c))
    generation.prefill(layer, cache.decode, seen["lay"], seen["k"], seen["v"], key, value, key_valid, config,
                       slot_counts=seen["c"])
    return out


def _prism(query, key, value, attention_mask, config, causal, scaling, averaging, module, plans):
    B, Nk = query.shape[0], key.shape[2]
    key_valid = key_valid_from_mask(attention_mask, B, Nk)
    roles = get_token_roles(module)
    layout = layout_for(key_valid, B, Nk, config, causal, query.device, roles)
    return simulate_prism(query, key, value, config=config, causal=causal, scale=scaling, key_valid=key_valid,
                          averaging=averaging, module=module, layout=layout, plans=plans, roles=roles)


_padded_eager = torch.compiler.disable(_prism, recursive=True)

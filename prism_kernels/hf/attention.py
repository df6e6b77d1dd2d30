"""Prism attention for Hugging Face models: P devices simulated in one process.

transformers calls `prism_attention_forward(module, query, key, value,
attention_mask, scaling=..., ...)` with the projections of the *whole*
sequence (query [B, H, N, d], key/value [B, Hkv, N, d], rotary already applied
for Llama). `simulate_prism` turns that into what P devices would compute:

  1. each sequence's real tokens are split into P contiguous partitions
     (python_ref.plan_layout, SPEC sec. 3);
  2. per partition j, the segment means of its keys and values (one
     prism_kernels.segment_means call over all rows and heads) with their
     counts and positions (a mean sits at its segment's last token);
  3. per device i, K~_i / V~_i = [own rows ; other partitions' means]
     (`assemble_device_kv`); in causal mode only earlier partitions' means;
  4. all devices of all sequences are stacked into the batch dimension and
     run in ONE prism_kernels.prism_attention call (scaling-aware softmax,
     partition-aware causal mask by global positions);
  5. each device's query rows are written back to their tokens.

Padding (SPEC does not cover it; this is the choice made here): a padded
token is not a token. Each sequence's real tokens are compacted (order kept)
and partitioned on their own, so a padded batch gives every sequence exactly
what it would get alone. Pads never enter a mean, never serve as keys, and
their output rows are zeros. Sequences of equal real length share one plan;
a sequence with fewer real tokens than P runs on as many devices as it has
tokens. Devices with fewer keys than the longest are padded with count-1
keys made invisible through positions (prism_attention has no mask argument:
with causal=True a key at position BIG+1 is seen by no query; non-causal
models use q_pos = BIG for every query and k_pos = 0 for every real key).

The seam for the distributed runtime (prism_kernels/distributed/): a real
device holds its local K/V and receives (k_means, v_means, counts, positions)
from the others; `assemble_device_kv` is the per-device assembly both share,
and the device then calls prism_kernels.prism_attention exactly as here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import python_ref
from python_ref.layout import plan_layout
from python_ref.partition import partition_sizes, segment_sizes

from ..api import prism_attention, segment_means
from .config import PrismConfig
from .masks import key_valid_from_mask

BIG = 1 << 40  # a position beyond any real token

Received = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def assemble_device_kv(local_k: torch.Tensor, local_v: torch.Tensor, local_positions: torch.Tensor,
                       received: Sequence[Received]):
    """K~_i, V~_i of one device (SPEC sec. 5, Eq. 6-7): own rows then received means.

    local_k, local_v: [B, Hkv, n_i, d]; local_positions: [n_i] int64 global
    positions of the device's tokens. received: (k_means [B, Hkv, m_j, d],
    v_means, counts [m_j], positions [m_j]) per source partition; their order
    does not matter (Eq. 5). Returns (k [B, Hkv, Nk, d], v, counts [Nk] int64,
    positions [Nk] int64) with Nk = n_i + sum m_j, ready for prism_attention.
    """
    ks, vs = [local_k], [local_v]
    counts = [torch.ones(local_k.shape[2], dtype=torch.int64, device=local_k.device)]
    positions = [local_positions.to(torch.int64)]
    for km, vm, c, p in received:
        ks.append(km.to(local_k.dtype))
        vs.append(vm.to(local_v.dtype))
        counts.append(c.to(torch.int64))
        positions.append(p.to(torch.int64))
    return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(counts), torch.cat(positions)


def differentiable_segment_means(x: torch.Tensor, m: int, backend: str):
    """prism_kernels.segment_means, or the pure-PyTorch reference when a gradient is needed.

    The prism::segment_means op has no autograd kernel (its backward would be
    silently dropped); the reference is the same computation in plain torch ops.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return python_ref.segment_means(x, m)
    return segment_means(x, m, backend=backend)


def mean_positions(offset: int, sizes: Sequence[int], device=None) -> torch.Tensor:
    """Global position of each segment mean: its segment's last token."""
    return torch.tensor(sizes, dtype=torch.int64, device=device).cumsum(0) + (offset - 1)


class Compaction:
    """Batch rows sorted by real length (longest first), each row's real tokens first, in order.

    Groups of equal length are then contiguous row ranges, so every group's
    tensors are views; tensors are gathered once per layer (cached by identity).
    """

    def __init__(self, key_valid: Optional[torch.Tensor], B: int, N: int, device):
        self.identity = key_valid is None
        if self.identity:
            self.perm = torch.arange(B, device=device)
            self.tokens = torch.arange(N, device=device).expand(B, N)
            self.lengths = [N] * B
        else:
            lengths = key_valid.sum(-1)
            self.perm = torch.sort(lengths, descending=True, stable=True).indices
            # a stable sort of the pad flags puts each row's real tokens first, in their order
            order = torch.sort((~key_valid).to(torch.int8), dim=-1, stable=True).indices
            self.tokens = order.index_select(0, self.perm)
            self.lengths = lengths.index_select(0, self.perm).tolist()
        self._cache = {}

    def compact(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t with rows permuted and, along `dim`, real tokens first."""
        if self.identity:
            return t
        key = (id(t), dim)
        if key not in self._cache:
            t2 = t.index_select(0, self.perm)
            shape = [1] * t2.dim()
            shape[0], shape[dim] = self.tokens.shape
            sizes = [t2.shape[k] if k not in (0, dim) else -1 for k in range(t2.dim())]
            self._cache[key] = (t, t2.gather(dim, self.tokens.reshape(shape).expand(*sizes)))
        return self._cache[key][1]

    def groups(self) -> List["Group"]:
        out, r0 = [], 0
        B = len(self.lengths)
        while r0 < B:
            L = self.lengths[r0]
            r1 = r0
            while r1 < B and self.lengths[r1] == L:
                r1 += 1
            if L > 0:          # an all-padding row has nothing to compute: its output stays zero
                out.append(Group(self, r0, r1, L))
            r0 = r1
        return out

    def restore(self, compact_out: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] in compacted coordinates -> original rows and token positions."""
        if self.identity:
            return compact_out
        result = torch.zeros_like(compact_out)
        result[self.perm[:, None], self.tokens] = compact_out
        return result


@dataclass
class Group:
    """Sequences of one real length L (rows r0:r1 of the compaction): one partition plan."""
    compaction: Compaction
    r0: int
    r1: int
    L: int

    @property
    def size(self) -> int:
        return self.r1 - self.r0

    @property
    def rows(self) -> torch.Tensor:
        """Original batch rows of the group."""
        return self.compaction.perm[self.r0:self.r1]

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This group's rows of t, real tokens only along `dim` (a view of the compaction)."""
        return self.compaction.compact(t, dim)[self.r0:self.r1].narrow(dim, 0, self.L)


MeansFn = Callable[["Group", int, int, int], Tuple[torch.Tensor, torch.Tensor]]
"""(group, offset_j, n_j, m_j) -> (k_means, v_means) [Bg, Hkv, m_j, d]; block-output variant."""


def simulate_prism(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, config: PrismConfig,
                   causal: bool, scale: Optional[float] = None, key_valid: Optional[torch.Tensor] = None,
                   means_fn: Optional[MeansFn] = None, plans: Optional[list] = None) -> torch.Tensor:
    """P simulated devices of one attention layer. Returns [B, N, H, d] (HF layout).

    query [B, H, N, d]; key, value [B, Hkv, N, d]; key_valid [B, N] bool or None.
    means_fn replaces the segment means of the keys/values (block-output
    variant). `plans`, when given a list, receives (group rows, PrismPlan) per
    group, for accounting.
    """
    B, H, N, d = query.shape
    Hkv = key.shape[1]
    dev = query.device
    backend = config.backend
    comp = Compaction(key_valid, B, N, dev)

    items = []   # (group, q, k, v, counts, q_pos, k_pos, offset)
    for g in comp.groups():
        q, k, v = g.take(query, 2), g.take(key, 2), g.take(value, 2)
        P = min(config.num_partitions, g.L)
        sizes = partition_sizes(g.L, P)
        ms = [config.means_for(n) for n in sizes]
        plan = plan_layout(g.L, P, ms, causal=causal)
        if plans is not None:
            plans.append((g.rows, plan))
        blocks = {}
        for j in sorted({s for dv in plan.devices for s in dv.sources}):
            o, n, m = plan.offsets[j], plan.sizes[j], plan.means[j]
            if means_fn is None:
                km, counts = differentiable_segment_means(k[:, :, o:o + n], m, backend)
                vm, _ = differentiable_segment_means(v[:, :, o:o + n], m, backend)
            else:
                km, vm = means_fn(g, o, n, m)
                counts = torch.tensor(segment_sizes(n, m), dtype=torch.int64, device=dev)
            blocks[j] = (km, vm, counts, mean_positions(o, segment_sizes(n, m), dev))
        for dv in plan.devices:
            o, n = dv.offset, dv.size
            lpos = torch.arange(o, o + n, device=dev)
            kt, vt, cnt, kpos = assemble_device_kv(k[:, :, o:o + n], v[:, :, o:o + n], lpos,
                                                   [blocks[j] for j in dv.sources])
            items.append((g, q[:, :, o:o + n], kt, vt, cnt, lpos, kpos, o))

    if not items:
        return query.new_zeros(B, N, H, d)

    # stack every device of every sequence into the batch dimension
    nq = max(it[1].shape[2] for it in items)
    nk = max(it[2].shape[2] for it in items)
    use_pos = causal or any(it[2].shape[2] != nk for it in items)
    Btot = sum(it[0].size for it in items)
    q_all = query.new_zeros(Btot, H, nq, d)
    k_all = key.new_zeros(Btot, Hkv, nk, d)
    v_all = value.new_zeros(Btot, Hkv, nk, d)
    c_all = torch.ones(Btot, nk, dtype=torch.int64, device=dev)
    if use_pos:
        qp_all = torch.full((Btot, nq), -1, dtype=torch.int64, device=dev)       # padded query: sees nothing
        kp_all = torch.full((Btot, nk), BIG + 1, dtype=torch.int64, device=dev)  # padded key: seen by none
    b0 = 0
    for g, q, k, v, cnt, qpos, kpos, _ in items:
        b1, n, m = b0 + g.size, q.shape[2], k.shape[2]
        q_all[b0:b1, :, :n] = q
        k_all[b0:b1, :, :m] = k
        v_all[b0:b1, :, :m] = v
        c_all[b0:b1, :m] = cnt
        if use_pos:
            qp_all[b0:b1, :n] = qpos if causal else BIG
            kp_all[b0:b1, :m] = kpos if causal else 0
        b0 = b1
    out = prism_attention(q_all, k_all, v_all, key_counts=c_all, causal=use_pos,
                          q_pos=qp_all if use_pos else None, k_pos=kp_all if use_pos else None,
                          scale=scale, backend=backend)

    # back to tokens: compacted coordinates first, then one scatter to the original layout
    res = query.new_zeros(B, N, H, d)
    b0 = 0
    for g, q, *_, o in items:
        b1, n = b0 + g.size, q.shape[2]
        res[g.r0:g.r1, o:o + n] = out[b0:b1, :, :n].transpose(1, 2)
        b0 = b1
    return comp.restore(res)


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


def prism_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers AttentionInterface entry "prism". Returns ([B, N, H, d], None)."""
    for unsupported in ("softcap", "sliding_window", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"prism attention does not support `{unsupported}`")
    config = get_prism_config(module)
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    if Nq != Nk:
        raise NotImplementedError(
            f"prism attention simulates one forward over the whole sequence (queries == keys); got "
            f"{Nq} queries and {Nk} keys (a KV cache during generation?). Run with use_cache=False.")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    key_valid = key_valid_from_mask(attention_mask, B, Nk)
    means_fn = None
    if config.averaging == "block_output":
        from .block_output import make_means_fn
        means_fn = make_means_fn(module, key.shape[1], config.backend)
    plans = getattr(module, "_prism_plans", None)
    out = simulate_prism(query, key, value, config=config, causal=causal, scale=scaling,
                         key_valid=key_valid, means_fn=means_fn, plans=plans)
    return out, None

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
import torch.nn.functional as F

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


def mean_positions(offset: int, sizes: Sequence[int], device=None) -> torch.Tensor:
    """Global position of each segment mean: its segment's last token."""
    return torch.tensor(sizes, dtype=torch.int64, device=device).cumsum(0) + (offset - 1)


@dataclass
class Group:
    """Sequences of one real length L: one partition plan."""
    rows: torch.Tensor               # [Bg] batch rows
    tokens: torch.Tensor             # [Bg, L] token index of each real token, in order
    L: int
    compact: bool                    # False: rows == all, tokens == arange (no gather needed)

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows of this group, real tokens only, along `dim` (the token axis)."""
        if not self.compact:
            return t
        t = t.index_select(0, self.rows)
        shape = [1] * t.dim()
        shape[0], shape[dim] = self.tokens.shape
        idx = self.tokens.reshape(shape).expand(*[t.shape[k] if k not in (0, dim) else -1
                                                  for k in range(t.dim())])
        return t.gather(dim, idx)


def make_groups(key_valid: Optional[torch.Tensor], B: int, N: int, device) -> List[Group]:
    if key_valid is None:
        return [Group(torch.arange(B, device=device),
                      torch.arange(N, device=device).expand(B, N), N, False)]
    lengths = key_valid.sum(-1)
    # stable sort puts each row's real tokens first, in their order
    order = torch.sort((~key_valid).to(torch.int8), dim=-1, stable=True).indices
    groups = []
    for L in sorted(set(lengths.tolist())):
        if L == 0:
            continue     # an all-padding row: nothing to compute, its output stays zero
        rows = (lengths == L).nonzero().flatten()
        groups.append(Group(rows, order.index_select(0, rows)[:, :L], int(L), True))
    return groups


MeansFn = Callable[[Group, int, int, int], Tuple[torch.Tensor, torch.Tensor]]
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
    dev = query.device
    backend = config.backend
    groups = make_groups(key_valid, B, N, dev)

    items = []   # (group, q, k, v, counts, q_pos, k_pos, token index [Bg, n_i])
    for g in groups:
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
                km, counts = segment_means(k[:, :, o:o + n], m, backend=backend)
                vm, _ = segment_means(v[:, :, o:o + n], m, backend=backend)
            else:
                km, vm = means_fn(g, o, n, m)
                counts = torch.tensor(segment_sizes(n, m), dtype=torch.int64, device=dev)
            blocks[j] = (km, vm, counts, mean_positions(o, segment_sizes(n, m), dev))
        for dv in plan.devices:
            o, n = dv.offset, dv.size
            lpos = torch.arange(o, o + n, device=dev)
            kt, vt, cnt, kpos = assemble_device_kv(k[:, :, o:o + n], v[:, :, o:o + n], lpos,
                                                   [blocks[j] for j in dv.sources])
            items.append((g, q[:, :, o:o + n], kt, vt, cnt, lpos, kpos, g.tokens[:, o:o + n]))

    if not items:
        return query.new_zeros(B, N, H, d)

    nq = max(it[1].shape[2] for it in items)
    nk = max(it[2].shape[2] for it in items)
    use_pos = causal or any(it[2].shape[2] != nk for it in items)
    qs, ks, vs, cs, qps, kps = [], [], [], [], [], []
    for g, q, k, v, cnt, qpos, kpos, _ in items:
        Bg, pq, pk = q.shape[0], nq - q.shape[2], nk - k.shape[2]
        qs.append(F.pad(q, (0, 0, 0, pq)))
        ks.append(F.pad(k, (0, 0, 0, pk)))
        vs.append(F.pad(v, (0, 0, 0, pk)))
        cs.append(F.pad(cnt, (0, pk), value=1).expand(Bg, nk))
        if use_pos:
            real_q = qpos if causal else torch.full_like(qpos, BIG)
            real_k = kpos if causal else torch.zeros_like(kpos)
            qps.append(F.pad(real_q, (0, pq), value=-1).expand(Bg, nq))
            kps.append(F.pad(real_k, (0, pk), value=BIG + 1).expand(Bg, nk))
    out = prism_attention(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), key_counts=torch.cat(cs),
        causal=use_pos, q_pos=torch.cat(qps) if use_pos else None,
        k_pos=torch.cat(kps) if use_pos else None, scale=scale, backend=backend)

    result = query.new_zeros(B, N, H, d)
    b0 = 0
    for g, q, *_, tok in items:
        Bg, n = q.shape[0], q.shape[2]
        result[g.rows[:, None], tok] = out[b0:b0 + Bg, :, :n].transpose(1, 2)
        b0 += Bg
    return result


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
        means_fn = make_means_fn(module, key.shape[1])
    plans = getattr(module, "_prism_plans", None)
    out = simulate_prism(query, key, value, config=config, causal=causal, scale=scaling,
                         key_valid=key_valid, means_fn=means_fn, plans=plans)
    return out, None

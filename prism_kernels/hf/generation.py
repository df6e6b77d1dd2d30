"""Generation from a Prism prefill: the KV cache of the decoding device.

The prompt runs as today: P simulated devices, each with its own tokens and the
segment means of the earlier partitions (hf/attention.py). Decoding then runs on the
LAST device alone. What it holds per layer depends on `decode` (enable_prism's
keyword, carried by the cache):

* "prism": its own K/V rows plus the K/V segment means it received from every earlier
  partition during the prefill, with their counts (log-count bias) and positions
  (last token of the segment). New tokens are appended with count 1. No byte is sent
  per generated token, and the cache holds n_P + sum_{j<P} m_j rows per layer instead
  of N.
* "exact": every prompt token's K/V row as the prefill computed it (each token on its
  own device), count 1: the decode attention is the stock attention over that cache.
* "voltage": the same rows and output as "exact"; the difference is accounting: the
  last device gathered the other partitions' K/V rows after the prefill
  (`CacheReport.gathered_bytes`).

`PrismCache` is a transformers `DynamicCache` whose layers (`PrismCacheLayer`) keep,
next to keys / values [B, Hkv, R, d], the count [B, R] and the global position [B, R]
of every row. Positions count real tokens only (as the prefill's plan does); a slot
that no query may see (padding) sits at position BIG + 1. `get_seq_length()` is the
number of tokens transformers has fed (pads included), which is what it derives
cache positions and masks from, not the number of rows held.

How the attention finds the cache: enable_prism installs a forward pre-hook on the
model that puts the call's PrismCache (replacing the empty DynamicCache that
`generate` creates) in a holder shared by every module; the prism attention then
checks that the keys it was given are that layer's cached keys before using them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..ops import check_backend_name

_attention_op = torch.ops.prism.attention.default     # what prism_kernels.prism_attention calls

DECODE_MODES = ("prism", "exact", "voltage")
BIG = 1 << 40          # same as hf.attention.BIG: a position no query reaches
GROW = 64              # spare rows a layer reserves when decoding outgrows its buffer


def check_decode_bias(config, decode: str) -> None:
    """decode="prism" keeps each received row's count (the log-count bias); refuse a bias
    that scores received rows with a term per head instead (matched rows, the spread)."""
    if decode == "prism" and config.bias_for(causal=True) != "log":   # decoders: "auto" is "log"
        raise NotImplementedError(
            f"generation with decode='prism' needs count_bias='log' (the decoders' default under "
            f"'auto'): the decoding device's cache keeps each received row's count, and "
            f"count_bias={config.count_bias!r} scores the received rows with a term per head "
            f"instead (a matched row's bias, or the spread); call "
            f"enable_prism(..., count_bias='log') or enable_prism(..., decode='exact')")


def check_decode(decode) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    return decode


class PrismCacheLayer(DynamicLayer):
    """One layer's cache: rows with counts and positions (see the module docstring).

    After `update` on an empty layer (the prefill) the rows are the prompt's as
    transformers computed them and `counts` is None until the prism attention replaces
    them with the decoding device's view (`set_rows`). Later updates append rows with
    count 1 at the next real positions.
    """
    is_croppable = False     # rows are not tokens (means): cropping by tokens has no meaning

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.counts: Optional[torch.Tensor] = None      # [B, R] int64
        self.positions: Optional[torch.Tensor] = None   # [B, R] int64
        self.next_pos: Optional[torch.Tensor] = None    # [B] real tokens so far = next position
        self.own: Optional[torch.Tensor] = None         # [B] the decoding device's own prompt tokens
        self.prompt: Optional[torch.Tensor] = None      # [B] real prompt tokens
        self.log_counts: Optional[torch.Tensor] = None  # [B, R] log(counts) in the kernel's accumulation dtype
        self.seen = 0                                   # tokens fed, pads included
        self._drop_buffers()

    def _drop_buffers(self) -> None:
        # preallocated room for decoded rows (see _grow); keys/values/counts/positions
        # are views of these while they exist
        self._buf, self._cap, self._steps = None, 0, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.seen == 0:
            # the prefill: held as given until the prism attention calls set_rows
            self.keys, self.values, self.counts = key_states, value_states, None
            self.seen = n
            return self.keys, self.values
        if self.counts is None:
            raise RuntimeError(
                "PrismCache: the prompt's rows of this layer were never set by the prism attention (was the "
                "model run under prism_kernels.hf.enable_prism, through its top-level forward?)")
        R = self.keys.shape[-2]
        if self._cap < R + n:
            self._grow(R + n)
        kb, vb, cb, pb, lb = self._buf
        kb[:, :, R:R + n].copy_(key_states)
        vb[:, :, R:R + n].copy_(value_states)
        cb[:, R:R + n] = 1
        lb[:, R:R + n] = 0.0                                      # log 1
        torch.add(self.next_pos[:, None], self._steps[:n], out=pb[:, R:R + n])
        # views of the buffers: the attention reads them in place (any row stride)
        self.keys, self.values = kb[:, :, :R + n], vb[:, :, :R + n]
        self.counts, self.positions, self.log_counts = cb[:, :R + n], pb[:, :R + n], lb[:, :R + n]
        self.next_pos = self.next_pos + n
        self.seen += n
        return self.keys, self.values

    def _grow(self, need: int) -> None:
        """Move the rows into buffers with room for `need` rows and GROW more: decoding
        then appends in place, copying the cache once every GROW tokens instead of at
        every step as torch.cat would. The spare room (at most GROW rows per layer) is
        not counted by cache_rows, which reports the rows held."""
        cap = need + GROW
        R = self.keys.shape[-2]
        B, H, _, d = self.keys.shape
        kb = self.keys.new_empty(B, H, cap, d)
        vb = self.values.new_empty(B, H, cap, d)
        cb = self.counts.new_empty(B, cap)
        pb = self.positions.new_empty(B, cap)
        lb = self.log_counts.new_empty(B, cap)
        kb[:, :, :R].copy_(self.keys)
        vb[:, :, :R].copy_(self.values)
        cb[:, :R].copy_(self.counts)
        pb[:, :R].copy_(self.positions)
        lb[:, :R].copy_(self.log_counts)
        self._buf, self._cap = (kb, vb, cb, pb, lb), cap
        self._steps = torch.arange(cap, dtype=torch.int64, device=self.counts.device)

    def set_rows(self, keys, values, counts, positions, next_pos, own):
        self._drop_buffers()
        self.keys, self.values = keys, values
        self.counts, self.positions, self.next_pos, self.own = counts, positions, next_pos, own
        self.prompt = next_pos
        # what prism_attention computes from key_counts at every call, once per prefill
        self.log_counts = counts.to(torch.float64 if keys.dtype == torch.float64 else torch.float32).log()

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.counts = self.positions = self.next_pos = self.own = self.prompt = self.log_counts = None
        self.seen = 0
        self._drop_buffers()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PrismCache cannot be cropped (its rows are segment means, not tokens)")

    def _select(self, fn) -> None:
        if self.counts is None:
            return
        self._drop_buffers()          # the selected rows are new tensors; buffers are made again on append
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.counts, self.positions, self.log_counts = fn(self.counts), fn(self.positions), fn(self.log_counts)
        self.next_pos, self.own, self.prompt = fn(self.next_pos), fn(self.own), fn(self.prompt)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))


class PrismCache(DynamicCache):
    """The decoding device's KV cache after a Prism prefill; `decode` says what it holds
    ("prism", "exact" or "voltage", see the module docstring). enable_prism creates one
    for `generate`; pass one yourself (`cache=PrismCache(...)`) to drive decoding by hand."""

    def __init__(self, decode: str = "prism"):
        Cache.__init__(self, layer_class_to_replicate=PrismCacheLayer)
        self.decode = check_decode(decode)

    def layer_of(self, module, key) -> Optional[PrismCacheLayer]:
        """The layer whose cached keys `key` is (the tensor its update returned), else None."""
        i = getattr(module, "layer_idx", None)
        if i is None or not 0 <= i < len(self.layers):
            return None
        layer = self.layers[i]
        return layer if isinstance(layer, PrismCacheLayer) and layer.keys is key else None


# ------------------------------------------------------------------ attention side


def prefill(layer: PrismCacheLayer, decode: str, lay, k_all, v_all, key, value, key_valid, config,
            slot_counts=None) -> None:
    """Replace the prefill rows of `layer` with what the last device keeps.

    lay, k_all, v_all: the layout and stacked key / value rows of the simulated devices
    (hf.attention.simulate_prism's capture); slot_counts [R, nk]: their counts when they
    are this layer's own (data-dependent segments; None: the layout's);
    key, value [B, Hkv, N, d] the prompt's own rows.
    """
    B, Hkv, N, d = key.shape
    dev = key.device
    i64 = dict(dtype=torch.int64, device=dev)
    row = torch.full((B,), -1, dtype=torch.int64)     # stacked row of each sequence's last device
    own = torch.zeros(B, dtype=torch.int64)
    real = torch.zeros(B, dtype=torch.int64)
    width = 1
    r0 = 0
    for g in lay.groups:
        for d_ in g.plan.devices:
            if d_.index == g.plan.num_partitions - 1:
                row[g.rows] = torch.arange(r0, r0 + g.size)
                own[g.rows] = d_.size
                width = max(width, d_.num_keys)
            r0 += g.size
        real[g.rows] = g.L
    own, real = own.to(dev), real.to(dev)
    check_decode_bias(config, decode)
    if decode == "prism":
        nk = lay.counts.shape[1]
        sel = row.clamp_min(0).to(dev)
        rows = lambda t: t.view(lay.rows, nk, Hkv, d).index_select(0, sel)[:, :width].transpose(1, 2)
        keys, values = rows(k_all), rows(v_all)
        counts = (lay.counts if slot_counts is None else slot_counts).index_select(0, sel)[:, :width].clone()
        pos = lay.k_pos.index_select(0, sel)[:, :width].clone()
        pos[(row < 0).to(dev)] = BIG + 1                     # an all-padding sequence holds nothing
    else:
        # every token's own row as the prefill computed it; pads at a position nobody sees
        keys, values = key, value
        counts = torch.ones(B, N, **i64)
        if key_valid is None:
            pos = torch.arange(N, **i64).expand(B, N).clone()
        else:
            kv = key_valid.to(dev)
            pos = torch.where(kv, kv.long().cumsum(-1) - 1, torch.full_like(counts, BIG + 1))
    layer.set_rows(keys.contiguous(), values.contiguous(), counts, pos, real, own)


def decode_step(layer: PrismCacheLayer, query, key, value, attention_mask, config, scaling):
    """The new tokens' queries against the layer's rows (cache + new). Returns [B, Nq, H, d]."""
    from .masks import key_valid_from_mask
    B, H, Nq, d = query.shape
    if attention_mask is not None:
        valid = key_valid_from_mask(attention_mask, B, attention_mask.shape[-1])
        if valid is not None and not bool(valid[:, -Nq:].all()):
            raise NotImplementedError("prism decoding: the new tokens must all be real (no padding after the prompt)")
    # The cache's rows are valid by construction (counts >= 1, int64 positions, shapes
    # from the model), so the op is called as prism_attention would call it after its
    # argument checks, with the log-counts kept by the layer: per decoded token this
    # saves the checks and the log of every count in every layer.
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    q_pos = layer.positions[:, -Nq:]
    out, _ = _attention_op(query, key, value, layer.log_counts, q_pos, layer.positions, scale,
                           check_backend_name(config.backend))
    return out.transpose(1, 2)


# ------------------------------------------------------------------ report


@dataclass
class CacheReport:
    """What the decoding device holds, against a stock cache of the same tokens.

    rows[l][b]: K/V rows held by layer l for sequence b (padding slots not counted);
    stock_rows[b]: rows a stock cache holds per layer (every real token);
    bytes / stock_bytes: keys and values of all layers, every sequence;
    gathered_bytes: K/V bytes the last device received after the prefill to build its
    cache ("voltage": the other partitions' rows; "prism": 0, its means arrived during
    the prefill; "exact": 0, a reference that is not a distributed scheme).
    No mode sends anything per generated token: the last device decodes alone.
    """
    decode: str
    rows: List[List[int]]
    stock_rows: List[int]
    bytes: int
    stock_bytes: int
    gathered_bytes: int

    @property
    def ratio(self) -> float:
        """stock_bytes / bytes (how many times smaller the cache is)."""
        return self.stock_bytes / self.bytes if self.bytes else float("inf")


def cache_rows(cache: PrismCache) -> CacheReport:
    """Rows and bytes of a PrismCache after (at least) the prefill, see CacheReport."""
    if not isinstance(cache, PrismCache):
        raise ValueError(f"cache must be a prism_kernels.hf.PrismCache, got {type(cache).__name__}")
    layers = [l for l in cache.layers if isinstance(l, PrismCacheLayer) and l.counts is not None]
    if not layers:
        raise ValueError("cache holds nothing yet: run a prefill (a forward or generate) first")
    rows, nbytes, stock, gathered = [], 0, 0, 0
    for l in layers:
        held = (l.positions <= BIG).sum(-1)                          # [B] rows a query can see
        per_row = 2 * l.keys.shape[1] * l.keys.shape[-1] * l.keys.element_size()   # K and V of one row
        rows.append(held.tolist())
        nbytes += int(held.sum()) * per_row
        stock += int(l.next_pos.sum()) * per_row
        if cache.decode == "voltage":
            gathered += int((l.prompt - l.own).sum()) * per_row
    return CacheReport(cache.decode, rows, layers[0].next_pos.tolist(), nbytes, stock, gathered)

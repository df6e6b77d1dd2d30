"""What the segment means are taken of (docs/method.md, "What is averaged").

enable_prism attaches one strategy to the model's modules; the attention function
asks it, per sequence group and partition, for the partition's K/V means:

    kv_means(inputs, group, part) -> (k_means, v_means), each [Bg, m_j, Hkv * d]

`inputs` (hf.attention.LayerInputs) holds the calling attention module and the
layer's keys / values as [B, N, Hkv * d]; `group.take(x, part)` gives the
partition's rows of any [B, N, F] tensor; `plan.partition_means` averages them.

* AttentionInputMeans ("attention_input", the default): the means of the keys and
  values the model computed (rotated keys for rotary models). Projections are
  affine, so this is K/V of the means of the normalised attention input.
* BlockInputMeans ("block_input", the paper's): the means of the block input X
  (the residual stream), normalised by the block's own pre-attention norm, then
  projected with the layer's K/V weights: K/V of LN(mean X). A forward pre-hook
  on the norm hands X over; for post-LN models (BERT, RoBERTa) X is the attention
  input. Rotary models: a mean's key is rotated by the average rotation of its
  tokens, k * mean(cos) + rotate_half(k) * mean(sin) -- exactly a token's own
  rotation when a segment is one token, so CR = 1 stays exact. Which module is the
  attention, its pre-norm, the K/V projection and whether the model is rotary come
  from the shared model table, prism_kernels.models.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..plan import partition_means


class AttentionInputMeans:
    name = "attention_input"

    def kv_means(self, inputs, group, part):
        b = inputs.backend
        return (partition_means(group.take(inputs.key, part), part, backend=b)[0],
                partition_means(group.take(inputs.value, part), part, backend=b)[0])

    def remove(self):
        pass


ATTENTION_INPUT = AttentionInputMeans()


class _Layer:
    def __init__(self, layer):
        self.layer = layer
        self.stash: Dict[str, torch.Tensor] = {}


def _blocks(model, entry):
    """The model's blocks, also when it wraps the table's model (a task head) or is its
    base model (GPT2Model for GPT2LMHeadModel): the longest suffix of the table's path
    that some submodule holds."""
    parts = entry.blocks_path.split(".")
    for k in range(len(parts)):
        for m in model.modules():
            obj = m
            for p in parts[k:]:
                obj = getattr(obj, p, None)
                if obj is None:
                    break
            if isinstance(obj, torch.nn.ModuleList):
                return list(obj)
    raise ValueError(f"no blocks at '{entry.blocks_path}' in {type(model).__name__}")


class BlockInputMeans:
    name = "block_input"

    def __init__(self, model):
        from ..models import Layer, lookup
        try:
            entry = lookup(model)
        except ValueError as e:
            raise ValueError(f"averaging='block_input' needs a model type of prism_kernels.models ({e}); "
                             "use averaging='attention_input' for other models") from None
        self.layers: Dict[torch.nn.Module, _Layer] = {}
        self.handles = []
        for i, block in enumerate(_blocks(model, entry)):
            attn = entry.attention(block)
            lay = _Layer(Layer(i, block, attn, entry.pre_norm(block),
                               lambda x, a=attn: entry.kv_fn(a, x), entry.rotary))
            self.layers[attn] = lay
            if lay.layer.pre_norm is not None:
                self.handles.append(lay.layer.pre_norm.register_forward_pre_hook(self._stash_norm_input(lay)))
            self.handles.append(attn.register_forward_pre_hook(self._stash_attn_input(lay), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(lambda *a, lay=lay: lay.stash.clear()))

    @staticmethod
    def _stash_norm_input(lay):
        def hook(mod, args):
            lay.stash["x"] = args[0]
        return hook

    @staticmethod
    def _stash_attn_input(lay):
        def hook(mod, args, kwargs):
            if lay.layer.pre_norm is None:
                lay.stash["x"] = args[0] if args else kwargs["hidden_states"]
            if lay.layer.rotary:
                pe = kwargs.get("position_embeddings")
                lay.stash["rotary"] = pe if pe is not None or len(args) < 2 else args[1]
        return hook

    def kv_means(self, inputs, group, part):
        lay = self.layers.get(inputs.module)
        if lay is None or "x" not in lay.stash:
            raise RuntimeError(f"averaging='block_input': no block input stashed for "
                               f"{type(inputs.module).__name__} (hooks of prism_kernels.hf.enable_prism)")
        b = inputs.backend
        x = lay.stash["x"]
        h, _ = partition_means(group.take(x, part), part, backend=b)      # means of the block input
        if lay.layer.pre_norm is not None:
            h = lay.layer.pre_norm.forward(h)     # normalised by the block's norm (.forward: not our hook)
        k, v = lay.layer.kv(h)                                            # [Bg, Hkv, m, d]
        if lay.layer.rotary:
            from ..models import apply_rotary
            rot = lay.stash.get("rotary")
            if rot is None:
                raise RuntimeError("block_input averaging for a rotary model needs position_embeddings")
            B, N = x.shape[:2]
            cos, sin = (partition_means(group.take(t.expand(B, N, t.shape[-1]), part), part, backend=b)[0]
                        for t in rot)
            k = apply_rotary(k, cos, sin)
        rows = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
        return rows(k), rows(v)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles, self.layers = [], {}


def make_averaging(name: str, model):
    """The strategy for PrismConfig.averaging, installed on `model` (remove() undoes it)."""
    if name == "attention_input":
        return ATTENTION_INPUT
    if name == "block_input":
        return BlockInputMeans(model)
    raise ValueError(f"unknown averaging {name!r}")

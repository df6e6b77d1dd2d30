"""The paper's averaging for pre-LayerNorm models (SPEC sec. 8): means of the block output.

In a pre-LN block the attention sees LN(X), X being the block input (= the
previous block's output, the residual stream every device holds). The paper's
devices exchange segment means of X itself; a receiver then computes the keys
and values of a mean as W_K LN(mean X) -- the mean is *normalised* by the
block's own pre-attention norm before the projections. That differs from the
default "attention_input" averaging, mean(W_K LN(X)) = W_K mean(LN(X)), because
LN is not linear; the bytes sent are the same.

How it is simulated: a forward pre-hook on the pre-attention norm (ln_1,
layernorm_before, norm1, input_layernorm) stashes X on the attention module;
for Llama a pre-hook on the attention module also stashes the rotary (cos, sin).
The attention function then asks `make_means_fn` for the keys/values of the
means: segment means of X (same partitions and segments as the plan), the
norm, the model's own K/V projections.

Llama (rotary): a mean stands for c tokens at different positions. Its key is
rotated by the *average* rotation of those positions, k * mean(cos) +
rotate_half(k) * mean(sin) -- linear, and exactly the token's own rotation
when c = 1, so CR = 1 stays exact.

Post-LN BERT has no norm between X and the projections: there both averagings
are the same thing (up to rounding) and the hook takes the attention module's
input; the test suite uses that as a check of this code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .attention import differentiable_segment_means


def _split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    Bg, m, _ = t.shape
    return t.view(Bg, m, -1, head_dim).transpose(1, 2)


def _kv_bert(mod, h):
    hd = mod.attention_head_size
    return _split_heads(mod.key(h), hd), _split_heads(mod.value(h), hd)


def _kv_qkv_proj(mod, h):   # ViT, DINOv2, Llama
    hd = mod.head_dim
    return _split_heads(mod.k_proj(h), hd), _split_heads(mod.v_proj(h), hd)


def _kv_gpt2(mod, h):
    _, k, v = mod.c_attn(h).split(mod.split_size, dim=2)
    return _split_heads(k, mod.head_dim), _split_heads(v, mod.head_dim)


@dataclass(frozen=True)
class Family:
    attn: str                      # dotted path layer -> module that calls the attention interface
    norm: Optional[str]            # layer attribute of the pre-attention norm (None: post-LN)
    kv: Callable
    rotary: bool = False


FAMILIES: Dict[str, Family] = {
    "BertLayer": Family("attention.self", None, _kv_bert),
    "ViTLayer": Family("attention", "layernorm_before", _kv_qkv_proj),
    "Dinov2Layer": Family("attention", "norm1", _kv_qkv_proj),
    "GPT2Block": Family("attn", "ln_1", _kv_gpt2),
    "LlamaDecoderLayer": Family("self_attn", "input_layernorm", _kv_qkv_proj, rotary=True),
}


def _get(mod, path):
    for p in path.split("."):
        mod = getattr(mod, p)
    return mod


def _stash_hidden(attn):
    def hook(mod, args):
        attn._prism_stash["x"] = args[0]
    return hook


def _stash_attn_input(attn, family):
    def hook(mod, args, kwargs):
        if family.norm is None:
            attn._prism_stash["x"] = args[0] if args else kwargs["hidden_states"]
        if family.rotary:
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            attn._prism_stash["rotary"] = pe
    return hook


def install(model) -> List:
    """Hooks for the block-output variant on every supported layer; returns the handles."""
    handles, attns = [], []
    for layer in model.modules():
        family = FAMILIES.get(type(layer).__name__)
        if family is None:
            continue
        attn = _get(layer, family.attn)
        attn._prism_stash = {}
        attn._prism_family = family
        attn._prism_norm = getattr(layer, family.norm) if family.norm else None
        attns.append(attn)
        if family.norm is not None:
            handles.append(attn._prism_norm.register_forward_pre_hook(_stash_hidden(attn)))
        if family.norm is None or family.rotary:
            handles.append(attn.register_forward_pre_hook(_stash_attn_input(attn, family), with_kwargs=True))
    if not attns:
        raise ValueError(
            f"averaging='block_output' supports layers {sorted(FAMILIES)}; found none in "
            f"{type(model).__name__}. Use averaging='attention_input' for other models.")
    return handles, attns


def uninstall(handles, attns):
    for h in handles:
        h.remove()
    for a in attns:
        for name in ("_prism_stash", "_prism_family", "_prism_norm"):
            if hasattr(a, name):
                delattr(a, name)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def make_means_fn(module, num_kv_heads: int, backend: str = "auto"):
    """(group, offset, n, m) -> (k_means, v_means) [Bg, Hkv, m, d] from the stashed block input."""
    stash = getattr(module, "_prism_stash", None)
    if not stash or "x" not in stash:
        raise RuntimeError(
            "averaging='block_output' needs the hooks installed by prism_kernels.hf.enable_prism "
            f"(supported layers: {sorted(FAMILIES)})")
    x = stash.pop("x")
    family, norm = module._prism_family, module._prism_norm
    rot = stash.pop("rotary", None) if family.rotary else None
    B, N = x.shape[:2]
    if family.rotary:
        if rot is None:
            raise RuntimeError("block_output averaging for a rotary model needs position_embeddings")
        cos, sin = (t.expand(B, N, t.shape[-1]) for t in rot)

    def segment_means(t, m):
        return differentiable_segment_means(t, m, backend)

    def means_fn(g, o, n, m):
        xm, _ = segment_means(g.take(x, 1)[:, o:o + n], m)          # means of the block input
        h = norm(xm) if norm is not None else xm                      # normalised means
        k, v = family.kv(module, h)
        if family.rotary:                                             # average rotation of the segment
            cm, _ = segment_means(g.take(cos, 1)[:, o:o + n], m)
            sm, _ = segment_means(g.take(sin, 1)[:, o:o + n], m)
            k = k * cm[:, None].to(k.dtype) + _rotate_half(k) * sm[:, None].to(k.dtype)
        return k, v
    return means_fn

"""FLOPs of one device's share of a forward pass, counted by running it.

The model is built from its config on the meta device (no weights, no memory,
no arithmetic) and the device's computation is run under
``torch.utils.flop_counter.FlopCounterMode``. Transformers routes every
attention layer through its AttentionInterface; we register one more
implementation, ``prism_cost``, which
  * receives Q, K, V that the layer's own projection modules computed from the
    device's q_rows (own tokens),
  * runs the same layer's K and V projection weights on the (kv_rows - q_rows)
    received rows (Voltage: the other partitions' hidden states; Prism: the
    received segment means of the attention input, wire "hidden") or, where the
    wire carries keys and values ("kv", "matched": the sender averages its own keys
    and values, the receiver projects nothing; `received_projected=False`), appends
    them as they are, and
  * runs ``scaled_dot_product_attention`` with q_rows queries and kv_rows keys.
Everything position-wise (output projection, FFN, norms, the LM head) runs on
the device's q_rows, exactly as on a real device.

Counted terms (FlopCounterMode counts matrix products at 2 FLOPs per
multiply-add): Q/K/V and output projections, attention core (QK^T and AV),
FFN, patch-embedding convolution, classification/LM heads. Not counted:
LayerNorm, softmax, GELU, bias additions, residual adds, embedding lookups.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .model_configs import ModelSpec, resolve_model

ATTN_IMPLEMENTATION = "prism_cost"

COUNTED_TERMS = (
    "Q/K/V and output projections, attention core (QK^T and AV), FFN, "
    "patch-embedding convolution, classification/LM heads; "
    "2 FLOPs per multiply-add, matrix products only"
)
NOT_COUNTED_TERMS = "LayerNorm, softmax, GELU, bias additions, residual adds, embedding lookups"

_ATTENTION_OPS = {"bmm", "baddbmm", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                  "_efficient_attention_forward"}
_EMBED_OPS = {"convolution", "_convolution", "conv2d"}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one run, split by term (keys of `terms` sum to `total`)."""
    total: int
    terms: Dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def __add__(self, other: "FlopCount") -> "FlopCount":
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0) + v
        return FlopCount(self.total + other.total, terms)


# --- the counting attention implementation ---------------------------------------

_EXTRA_ROWS = contextvars.ContextVar("prism_cost_extra_rows", default=0)
_PROJECT_EXTRA = contextvars.ContextVar("prism_cost_project_extra", default=True)
_CALLS = contextvars.ContextVar("prism_cost_calls", default=None)


def _linear_in_features(mod) -> int:
    w = mod.weight
    return w.shape[1] if isinstance(mod, torch.nn.Linear) else w.shape[0]


def _project_received(module, batch: int, rows: int, kv_heads: int, k_dim: int, v_dim: int, like):
    """K and V of `rows` received rows, by the layer's own K/V projection weights."""
    def heads(t, d):
        return t.view(batch, rows, kv_heads, d).transpose(1, 2)

    for kname, vname in (("k_proj", "v_proj"), ("key", "value"), ("k_lin", "v_lin")):
        kmod, vmod = getattr(module, kname, None), getattr(module, vname, None)
        if isinstance(kmod, torch.nn.Module) and isinstance(vmod, torch.nn.Module) and hasattr(kmod, "weight"):
            x = like.new_empty(batch, rows, _linear_in_features(kmod))
            return heads(kmod(x), k_dim), heads(vmod(x), v_dim)
    c_attn = getattr(module, "c_attn", None)
    if c_attn is not None and hasattr(c_attn, "weight") and not isinstance(c_attn, torch.nn.Linear):
        # GPT-2 Conv1D: weight [in, 3 * split], columns [Q | K | V]; run only the K|V columns.
        w, b = c_attn.weight, c_attn.bias
        s = w.shape[1] - (k_dim + v_dim) * kv_heads
        x = like.new_empty(batch * rows, w.shape[0])
        kv = torch.addmm(b[s:], x, w[:, s:]) if b is not None else x @ w[:, s:]
        k, v = kv.split([k_dim * kv_heads, v_dim * kv_heads], dim=-1)
        return heads(k, k_dim), heads(v, v_dim)
    for name in ("qkv_proj", "query_key_value", "Wqkv", "qkv", "c_attn"):
        mod = getattr(module, name, None)
        if isinstance(mod, torch.nn.Linear):
            n = (k_dim + v_dim) * kv_heads
            x = like.new_empty(batch, rows, mod.in_features)
            kv = F.linear(x, mod.weight[-n:], None if mod.bias is None else mod.bias[-n:])
            k, v = kv.split([k_dim * kv_heads, v_dim * kv_heads], dim=-1)
            return heads(k, k_dim), heads(v, v_dim)
    raise ValueError(
        f"cost model: cannot find the K/V projections of attention module {type(module).__name__} "
        f"(looked for k_proj/v_proj, key/value, k_lin/v_lin, c_attn, qkv_proj, query_key_value, Wqkv)")


def _cost_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    calls = _CALLS.get()
    if calls is not None:
        calls.append(type(module).__name__)
    extra = _EXTRA_ROWS.get()
    if extra:
        b, hkv = key.shape[0], key.shape[1]
        if _PROJECT_EXTRA.get():
            ek, ev = _project_received(module, b, extra, hkv, key.shape[-1], value.shape[-1], query)
        else:           # keys and values on the wire: nothing to project
            ek, ev = key.new_empty(b, hkv, extra, key.shape[-1]), value.new_empty(b, hkv, extra, value.shape[-1])
        key = torch.cat([key, ek.to(key.dtype)], dim=2)
        value = torch.cat([value, ev.to(value.dtype)], dim=2)
    h = query.shape[1]
    if key.shape[1] != h:                  # grouped-query attention: share K/V heads
        rep = h // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    # The mask (causal / padding) changes no FLOP count: the scores are computed in full.
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register():
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, _cost_attention)


# --- building and running the meta model -------------------------------------------

def _config_key(spec: ModelSpec) -> str:
    return spec.kind + "\n" + spec.config.to_json_string(use_diff=False)


_MODELS: Dict[str, torch.nn.Module] = {}
_DEVICE_FLOPS: Dict[tuple, "FlopCount"] = {}


def _meta_model_cached(key: str, spec: ModelSpec):
    if key in _MODELS:
        return _MODELS[key]
    import transformers
    _register()
    config = copy.deepcopy(spec.config)
    auto = {"causal": transformers.AutoModelForCausalLM,
            "vision": transformers.AutoModelForImageClassification,
            "encoder": transformers.AutoModelForSequenceClassification}[spec.kind]
    with torch.device("meta"):
        try:
            model = auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        except (ValueError, TypeError, KeyError):
            # no task head class for this model type: the base model (no head counted)
            try:
                model = transformers.AutoModel.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
            except Exception as e:
                raise ValueError(f"cost model: cannot build model type {config.model_type!r} with a custom "
                                 f"attention implementation ({type(e).__name__}: {e})") from e
    model.eval()
    if len(_MODELS) >= 16:
        _MODELS.pop(next(iter(_MODELS)))
    _MODELS[key] = model
    return model


def meta_model(model) -> torch.nn.Module:
    """The task model of `model` (preset / type / path / config) on the meta device."""
    spec = resolve_model(model)
    return _meta_model_cached(_config_key(spec), spec)


def _head_modules(m: torch.nn.Module):
    """FQN suffixes of head modules: task-model children beside the base model, and a pooler."""
    base = getattr(m, "base_model_prefix", "")
    names = [n for n, _ in m.named_children() if n != base]
    base_model = getattr(m, base, None) if base else None
    if base_model is not None and getattr(base_model, "pooler", None) is not None:
        names.append(f"{base}.pooler")
    return names


def _pixel_values(config, batch: int = 1):
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    return torch.empty(batch, getattr(config, "num_channels", 3), *size, device="meta")


def _run(spec: ModelSpec, m: torch.nn.Module, rows: int):
    hidden = spec.hidden_size
    if spec.kind == "vision":
        emb = m.base_model.embeddings
        # The master embeds the image once (embedding_flops); a device starts from its rows.
        emb.forward = lambda *a, **k: torch.empty(1, rows, hidden, device="meta")
        try:
            m(pixel_values=_pixel_values(spec.config))
        finally:
            del emb.forward
    else:
        kwargs = {"use_cache": False} if spec.kind == "causal" else {}
        width = getattr(m.get_input_embeddings(), "embedding_dim", hidden)   # ELECTRA: embedding < hidden
        m(inputs_embeds=torch.empty(1, rows, width, device="meta"), **kwargs)


def vision_seq_len(model) -> int:
    """N of a vision model: rows its embedding module makes of one image (ViT: patches + CLS)."""
    spec = resolve_model(model)
    if spec.kind != "vision":
        raise ValueError(f"{spec.name} is not a vision model")
    m = meta_model(spec)
    try:
        with torch.no_grad():
            return int(m.base_model.embeddings(_pixel_values(spec.config)).shape[1])
    except Exception as e:
        raise ValueError(f"cost model: {spec.name} is not a ViT-like model (one embedding module making "
                         f"a token sequence): {type(e).__name__}: {e}") from e


def _op_name(op) -> str:
    return getattr(op, "__name__", str(op)).split(".")[0]


def _split_ops(ops: Dict) -> Dict[str, int]:
    """{op: flops} -> attention core / embeddings (convolution) / linear (the rest)."""
    attn = sum(v for op, v in ops.items() if _op_name(op) in _ATTENTION_OPS)
    conv = sum(v for op, v in ops.items() if _op_name(op) in _EMBED_OPS)
    return {"linear": sum(ops.values()) - attn - conv, "attention_core": attn, "embeddings": conv}


def _layer_list(m: torch.nn.Module, num_layers: int):
    """(parent module, attribute name, ModuleList) of the model's Transformer blocks, or None."""
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers and num_layers > 1:
            parent_name, _, attr = name.rpartition(".")
            return (m.get_submodule(parent_name) if parent_name else m), attr, mod, name
    return None


def _signature(layer: torch.nn.Module):
    return tuple((n, type(x).__name__, tuple((pn, tuple(p.shape)) for pn, p in x.named_parameters(recurse=False)))
                 for n, x in layer.named_modules())


def _homogeneous_layers(m: torch.nn.Module, num_layers: int):
    """The block list if every block has the same structure and weight shapes, else None.

    Then every block does the same FLOPs on the same shapes (masks change no
    count), so one block is run and its count multiplied by the number of blocks.
    """
    found = _layer_list(m, num_layers)
    if found is None:
        return None
    sig = _signature(found[2][0])
    return found if all(_signature(layer) == sig for layer in found[2]) else None


def _count(spec: ModelSpec, m: torch.nn.Module, q_rows: int, full_run: bool) -> Dict[str, int]:
    """Run the device's forward under FlopCounterMode; FLOPs by term."""
    layers = None if full_run else _homogeneous_layers(m, spec.num_layers)
    root = type(m).__name__
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if layers is None:
            _run(spec, m, q_rows)
        else:
            parent, attr, full, _ = layers
            setattr(parent, attr, torch.nn.ModuleList([full[0]]))
            try:
                _run(spec, m, q_rows)
            finally:
                setattr(parent, attr, full)
    counts = fc.get_flop_counts()
    terms = _split_ops(counts.get("Global", {}))
    if layers is not None:      # add the other L - 1 blocks
        block = _split_ops(counts.get(f"{root}.{layers[3]}.0", {}))
        for k, v in block.items():
            terms[k] += (spec.num_layers - 1) * v
    head = sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in _head_modules(m))
    terms["linear"] -= head
    terms["head"] = head
    return terms


def _device_flops_cached(key: str, spec: ModelSpec, q_rows: int, kv_rows: int, holds_first_token: bool,
                         full_run: bool = False, received_projected: bool = True):
    ck = (key, q_rows, kv_rows, holds_first_token, full_run, received_projected)
    if ck in _DEVICE_FLOPS:
        return _DEVICE_FLOPS[ck]
    m = _meta_model_cached(key, spec)
    calls = []
    t1, t2, t3 = _EXTRA_ROWS.set(kv_rows - q_rows), _CALLS.set(calls), _PROJECT_EXTRA.set(received_projected)
    try:
        terms = _count(spec, m, q_rows, full_run)
    except ValueError:
        raise
    except Exception as e:       # the model's forward does not fit this way of counting
        raise ValueError(f"cost model: cannot run model type {spec.config.model_type!r} this way "
                         f"({type(e).__name__}: {e})") from e
    finally:
        _EXTRA_ROWS.reset(t1)
        _CALLS.reset(t2)
        _PROJECT_EXTRA.reset(t3)
    if not calls:
        raise ValueError(
            f"cost model: model type {spec.config.model_type!r} does not route attention through "
            f"transformers' AttentionInterface, so its key/value rows cannot be set")
    if spec.kind != "causal" and not holds_first_token:
        terms["head"] = 0      # pooler/classifier run on the [CLS] row only, on its device
    result = FlopCount(sum(terms.values()), terms)
    _DEVICE_FLOPS[ck] = result
    return result


def device_flops(model, q_rows: int, kv_rows: Optional[int] = None, *, holds_first_token: bool = True,
                 full_run: bool = False, received_projected: bool = True) -> FlopCount:
    """FLOPs of one device's forward (all layers): q_rows own tokens, kv_rows keys/values.

    Single device: q_rows = kv_rows = N. Voltage device i: q_rows = n_i, kv_rows = N.
    Prism device i: q_rows = n_i, kv_rows = n_i + sum_{j != i} m_j.
    received_projected: whether the device runs its K/V projections on the received
    rows (hidden states or attention-input means, wire "hidden"); False where keys and
    values arrive (wire "kv" / "matched"; costs.comm.wire_format). The senders' segment
    sums are not matrix products of the model and are not counted.
    The head: an LM head (causal models) runs on the device's q_rows; a
    classification head (pooler/classifier on [CLS]) counts only when
    holds_first_token. Embedding work is not included (see embedding_flops).
    """
    spec = resolve_model(model)
    kv_rows = q_rows if kv_rows is None else kv_rows
    for name, v in (("q_rows", q_rows), ("kv_rows", kv_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if kv_rows < q_rows:
        raise ValueError(f"kv_rows must be >= q_rows (a device attends to its own rows), got {kv_rows} < {q_rows}")
    holds = bool(holds_first_token) or spec.causal   # an LM head runs on every device's rows
    return _device_flops_cached(_config_key(spec), spec, q_rows, kv_rows, holds, bool(full_run),
                                bool(received_projected))


def embedding_flops(model) -> FlopCount:
    """FLOPs the master spends embedding the input once (ViT: the patch convolution).

    Token-embedding lookups and position-embedding additions count 0.
    """
    spec = resolve_model(model)
    m = meta_model(spec)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if spec.kind == "vision":
            m.base_model.embeddings(_pixel_values(spec.config))
        else:
            m.get_input_embeddings()(torch.zeros(1, 1, dtype=torch.long, device="meta"))
    total = fc.get_total_flops()
    return FlopCount(total, {"linear": 0, "attention_core": 0, "embeddings": total, "head": 0})

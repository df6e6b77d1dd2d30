"""enable_prism / disable_prism: switch a loaded model to simulated Prism and back.

enable_prism sets attn_implementation "prism" on every config of the model (top
level and sub-configs) and attaches the PrismConfig and the averaging strategy
(hf/averaging.py; block_input installs forward hooks) to every module: the
attention function reads both from the module it is called with. Weights are not
touched. disable_prism undoes exactly that: the previous attention implementation
of each config, no extra attributes, no hooks.

enable_prism checks first, before touching the model: the settings (PrismConfig
validates P, CR / m, averaging and backend), that the model is a transformers
model, and that its config.model_type is one of prism_kernels.models.MODEL_TYPES,
the types whose attention goes through transformers' AttentionInterface without
extras Prism cannot simulate (T5's relative position bias, for instance) and that
the tests cover. `allow_untested=True` skips the model-type check for another
model whose attention uses the interface; it then fails, if at all, at the forward.

For generation (hf/generation.py) a second forward pre-hook hands the attention the
call's PrismCache: it replaces the empty DynamicCache that `generate` creates (or a
missing cache under use_cache=True) by a PrismCache of the model's `decode` mode.

It also installs a forward pre-hook on the model that refuses
output_attentions=True (argument or config): the fused Prism kernel never
materialises attention weights, and transformers would otherwise return empty
attention tuples without a word.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..anchors import DEFAULT_ANCHOR_BUDGET, DEFAULT_COUNT_BIAS, DEFAULT_ANCHOR_SCORE, DEFAULT_ANCHOR_TOPK, DEFAULT_ANCHORS, DEFAULT_SEGMENTS
from ..config import PrismConfig
from .attention import prism_attention_forward
from .averaging import make_averaging

_registered = False

try:    # transformers' (private) record of the outputs the running forward collects
    from transformers.utils.output_capturing import _active_collector as _collector
except ImportError:     # another transformers version: only the kwargs check remains
    _collector = None


def register() -> None:
    """Register "prism" in transformers' AttentionInterface and AttentionMaskInterface.

    Both are needed: without the mask entry transformers builds no padding mask for
    an unknown implementation name and padded tokens would silently be attended to.
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .masks import prism_mask

    AttentionInterface.register("prism", prism_attention_entry)
    AttentionMaskInterface.register("prism", prism_mask)
    _registered = True


def _configs(model):
    seen, out = set(), []
    for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]:
        if c is not None and hasattr(c, "_attn_implementation_internal") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def supported_model_types():
    """The model types enable_prism accepts without allow_untested (prism_kernels.models)."""
    from ..models import MODEL_TYPES
    return tuple(MODEL_TYPES)


def check_supported(model, allow_untested: bool = False) -> None:
    """Raise ValueError unless enable_prism can run `model` (see the module docstring)."""
    types = ", ".join(supported_model_types())
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "_attn_implementation_internal"):
        raise ValueError(
            f"enable_prism: {type(model).__module__}.{type(model).__qualname__} is not a transformers model "
            f"(no .config with an attention implementation); Prism runs transformers models of the types: {types}")
    mt = getattr(cfg, "model_type", None)
    if mt not in supported_model_types() and not allow_untested:
        raise ValueError(
            f"enable_prism: model type {mt!r} ({type(model).__name__}) is not supported; supported model "
            f"types: {types}. (Prism is simulated inside transformers' attention interface; models with "
            f"extras such as T5's relative position bias cannot run. Pass allow_untested=True to try another "
            f"model whose attention goes through the interface.)")


OUTPUT_ATTENTIONS_MESSAGE = (
    "output_attentions=True is not supported under Prism: the fused Prism attention kernel does not "
    "materialise attention weights (transformers would return empty attentions). Call the model without "
    "output_attentions, or disable_prism(model) first.")


def _refuse_output_attentions(module, args, kwargs):
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError(OUTPUT_ATTENTIONS_MESSAGE)
    return None


def prism_attention_entry(module, query, key, value, attention_mask, *args, **kwargs):
    """What "prism" is registered as: hf.attention.prism_attention_forward, refusing output_attentions.

    The refusal lives here as well as in enable_prism's pre-hook because a model built
    with attn_implementation="prism" (config route) has no hook, and transformers would
    return empty attentions. Two signals: output_attentions in the attention kwargs
    (BERT passes the caller's down), and transformers' output collector asking for
    "attentions" (models such as GPT-2 drop the kwarg and collect through hooks).
    """
    # the argument when given, else the config: what transformers itself decides from
    if kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)):
        raise ValueError(OUTPUT_ATTENTIONS_MESSAGE)
    if _collector is not None:
        if torch.compiler.is_compiling():
            # dynamo cannot trace ContextVar.get; while compiling transformers keeps the
            # collector in a plain attribute (no check when that is not so)
            collected = getattr(_collector, "global_var", None) if getattr(_collector, "compiling", False) else None
        else:
            collected = _collector.get()
        if collected is not None and "attentions" in collected:
            raise ValueError(OUTPUT_ATTENTIONS_MESSAGE)
    return prism_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def enable_prism(model, num_partitions: int = 2, *, compression_rate: Optional[float] = None,
                 num_means: Optional[int] = None, averaging: str = "attention_input",
                 backend: str = "auto", partition_weights: Optional[Sequence[float]] = None,
                 anchors: str = DEFAULT_ANCHORS, segments: str = DEFAULT_SEGMENTS,
                 anchor_budget: str = DEFAULT_ANCHOR_BUDGET, count_bias: str = DEFAULT_COUNT_BIAS,
                 anchor_topk=DEFAULT_ANCHOR_TOPK, anchor_score: str = DEFAULT_ANCHOR_SCORE, wire_dtype: str = "fp32",
                 config: Optional[PrismConfig] = None, allow_untested: bool = False, decode: str = "prism"):
    """Run `model` as P simulated Prism devices. Returns the model (modified in place).

    Give compression_rate (CR >= 1, Eq. 16) or num_means (m per partition), or a
    ready PrismConfig (or its dict) as `config`. Calling it again replaces the
    settings. anchors / segments / anchor_budget / anchor_topk / anchor_score choose
    which tokens are sent alone and how the others are grouped (prism_kernels/anchors.py;
    the defaults are the best measured policy, with segments chosen per layer from the
    keys, prism_kernels/dynamic.py; anchors="none", segments="runs" is the paper's plain
    means); count_bias "auto" (default) sends rows matched at the mean query (hf/matched_summary.py)
    for text encoders, at the [CLS] query for vision encoders, and uses the paper's log-count
    bias ("log") for decoders; "matched" / "matched_half" / "matched_shared" / "matched_cls"
    choose the matched rows, "spread" (hf/spread_bias.py) is an experiment. wire_dtype (fp32 | fp16 | bf16) rounds every row a device
    receives (means and anchors) to that type, as `prism run --wire-dtype` sends them. Raises ValueError at once for invalid settings (backend included) and
    for a model whose config.model_type is not in prism_kernels.models.MODEL_TYPES
    (unless allow_untested=True).

    decode: what the last device decodes from after a Prism prefill in `generate`
    (hf/generation.py): "prism" (its own rows + the segment means it received, with
    their counts), "exact" (every prompt token's row) or "voltage" (the same rows,
    gathered onto the last device; accounted in bytes).
    """
    from .generation import check_decode
    check_decode(decode)
    if config is None:
        config = PrismConfig(num_partitions=num_partitions, num_means=num_means,
                             compression_rate=compression_rate, averaging=averaging, backend=backend,
                             partition_weights=partition_weights, anchors=anchors, segments=segments,
                             anchor_budget=anchor_budget, count_bias=count_bias,
                             anchor_topk=anchor_topk, anchor_score=anchor_score, wire_dtype=wire_dtype)
    else:
        config = PrismConfig.from_any(config)
    check_supported(model, allow_untested)
    register()
    if getattr(model, "_prism_state", None) is not None:
        disable_prism(model)
    strategy = make_averaging(config.averaging, model)
    configs = _configs(model)
    hook = model.register_forward_pre_hook(_refuse_output_attentions, with_kwargs=True)
    generation = {"decode": decode, "cache": None}
    hooks = [hook] + _install_cache_hooks(model, generation)
    model._prism_state = {"attn": [(c, c._attn_implementation_internal) for c in configs],
                          "averaging": strategy, "hooks": hooks}
    for c in configs:
        c._attn_implementation_internal = "prism"
    from ..models import token_roles
    roles = token_roles(model)
    for m in model.modules():
        m._prism_config = config
        m._prism_averaging = strategy
        m._prism_roles = roles
        m._prism_generation = generation
    return model


def _cache_argument(model) -> Optional[str]:
    """The name under which model.forward takes its KV cache, None for a model without one."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _install_cache_hooks(model, generation) -> list:
    """Hooks that give the prism attention the call's PrismCache (hf/generation.py)."""
    name = _cache_argument(model)
    from ..models.table import TABLE
    entry = TABLE.get(getattr(model.config, "model_type", None))
    # decoders only: an encoder called with use_cache=True keeps its stock behaviour
    causal = entry.kind == "causal" if entry is not None else bool(getattr(model.config, "is_decoder", False))
    if name is None or not causal:
        return []
    from transformers.cache_utils import DynamicCache

    from .generation import PrismCache

    def before(module, args, kwargs):
        key = next((n for n in ("cache", "past_key_values") if kwargs.get(n) is not None), name)
        cache = kwargs.get(key)
        if (cache is None and kwargs.get("use_cache") is True) or (
                type(cache) is DynamicCache and cache.get_seq_length() == 0):
            # generate's fresh DynamicCache (or use_cache=True without one): the decoding
            # device's cache instead; the model returns it and generate goes on with it
            cache = PrismCache(generation["decode"])
            kwargs[key] = cache
        if isinstance(cache, PrismCache):
            _check_decode_bias(module, cache)
        generation["cache"] = cache if isinstance(cache, PrismCache) else None
        return args, kwargs

    def after(module, args, output):
        generation["cache"] = None

    return [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]


def _check_decode_bias(model, cache) -> None:
    """Refuse, before the prefill runs, a decode cache that cannot hold the received rows."""
    from .generation import check_decode_bias
    config = getattr(model, "_prism_config", None)
    if config is not None and cache.get_seq_length() == 0:
        check_decode_bias(config, cache.decode)


def disable_prism(model):
    """Restore the model exactly as it was before enable_prism. Returns the model."""
    state = getattr(model, "_prism_state", None)
    if state is None:
        return model
    for c, impl in state["attn"]:
        c._attn_implementation_internal = impl
    state["averaging"].remove()
    for h in state["hooks"]:
        h.remove()
    for m in model.modules():
        for name in ("_prism_config", "_prism_averaging", "_prism_roles", "_prism_generation"):
            m.__dict__.pop(name, None)
    del model._prism_state
    return model


def prism_config_of(model) -> Optional[PrismConfig]:
    """The PrismConfig `model` runs with, or None when it does not run Prism.

    Set by enable_prism (or prism_kernels.hf.from_pretrained), or, for a model built
    with attn_implementation="prism", its config.prism (a PrismConfig or its dict).
    """
    state = getattr(model, "_prism_state", None)
    if state is not None:
        return model._prism_config
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation_internal", None) == "prism" and getattr(cfg, "prism", None) is not None:
        return PrismConfig.from_any(cfg.prism)
    return None

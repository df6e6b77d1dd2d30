"""enable_prism / disable_prism: switch a loaded model to simulated Prism and back.

enable_prism sets attn_implementation "prism" on every config of the model (top
level and sub-configs) and attaches the PrismConfig and the averaging strategy
(hf/averaging.py; block_input installs forward hooks) to every module: the
attention function reads both from the module it is called with. Weights are not
touched. disable_prism undoes exactly that: the previous attention implementation
of each config, no extra attributes, no hooks.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..config import PrismConfig
from .averaging import make_averaging

_registered = False


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

    from .attention import prism_attention_forward
    from .masks import prism_mask

    AttentionInterface.register("prism", prism_attention_forward)
    AttentionMaskInterface.register("prism", prism_mask)
    _registered = True


def _configs(model):
    seen, out = set(), []
    for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]:
        if c is not None and hasattr(c, "_attn_implementation_internal") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def enable_prism(model, num_partitions: int = 2, *, compression_rate: Optional[float] = None,
                 num_means: Optional[int] = None, averaging: str = "attention_input",
                 backend: str = "auto", partition_weights: Optional[Sequence[float]] = None,
                 config: Optional[PrismConfig] = None):
    """Run `model` as P simulated Prism devices. Returns the model (modified in place).

    Give compression_rate (CR >= 1, Eq. 16) or num_means (m per partition), or a
    ready PrismConfig as `config`. Calling it again replaces the settings.
    """
    if config is None:
        config = PrismConfig(num_partitions=num_partitions, num_means=num_means,
                             compression_rate=compression_rate, averaging=averaging, backend=backend,
                             partition_weights=partition_weights)
    register()
    if getattr(model, "_prism_state", None) is not None:
        disable_prism(model)
    strategy = make_averaging(config.averaging, model)
    configs = _configs(model)
    model._prism_state = {"attn": [(c, c._attn_implementation_internal) for c in configs],
                          "averaging": strategy}
    for c in configs:
        c._attn_implementation_internal = "prism"
    for m in model.modules():
        m._prism_config = config
        m._prism_averaging = strategy
    return model


def disable_prism(model):
    """Restore the model exactly as it was before enable_prism. Returns the model."""
    state = getattr(model, "_prism_state", None)
    if state is None:
        return model
    for c, impl in state["attn"]:
        c._attn_implementation_internal = impl
    state["averaging"].remove()
    for m in model.modules():
        for name in ("_prism_config", "_prism_averaging"):
            m.__dict__.pop(name, None)
    del model._prism_state
    return model


def prism_config_of(model) -> Optional[PrismConfig]:
    state = getattr(model, "_prism_state", None)
    return None if state is None else model._prism_config

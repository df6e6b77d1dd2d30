"""enable_prism / disable_prism: switch a loaded model to simulated Prism and back.

enable_prism sets attn_implementation "prism" on every config of the model
(top level and sub-configs), attaches the PrismConfig to every module (the
attention function reads it from the module it is called with), and for
averaging="block_output" installs the hooks of prism_kernels.hf.block_output.
Weights are not touched. disable_prism undoes exactly that: the previous
attention implementation of each config, no extra attributes, no hooks.
"""
from __future__ import annotations

from typing import Optional

from . import block_output
from .config import PrismConfig
from .registry import register


def _configs(model):
    seen, out = set(), []
    for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]:
        if c is not None and hasattr(c, "_attn_implementation_internal") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def enable_prism(model, num_partitions: int = 2, *, compression_rate: Optional[float] = None,
                 num_means: Optional[int] = None, averaging: str = "attention_input",
                 backend: str = "auto", config: Optional[PrismConfig] = None):
    """Run `model` as P simulated Prism devices. Returns the model (modified in place).

    Give compression_rate (CR >= 1, Eq. 16) or num_means (m per partition), or a
    ready PrismConfig as `config`. Calling it again replaces the settings.
    """
    if config is None:
        config = PrismConfig(num_partitions=num_partitions, num_means=num_means,
                             compression_rate=compression_rate, averaging=averaging, backend=backend)
    register()
    if getattr(model, "_prism_state", None) is not None:
        disable_prism(model)
    handles, attns = ([], [])
    if config.averaging == "block_output":
        handles, attns = block_output.install(model)
    configs = _configs(model)
    state = {"attn": [(c, c._attn_implementation_internal) for c in configs],
             "hooks": (handles, attns)}
    for c in configs:
        c._attn_implementation_internal = "prism"
    for m in model.modules():
        m._prism_config = config
    model._prism_state = state
    return model


def disable_prism(model):
    """Restore the model exactly as it was before enable_prism. Returns the model."""
    state = getattr(model, "_prism_state", None)
    if state is None:
        return model
    for c, impl in state["attn"]:
        c._attn_implementation_internal = impl
    block_output.uninstall(*state["hooks"])
    for m in model.modules():
        if "_prism_config" in m.__dict__:
            del m._prism_config
    del model._prism_state
    return model


def prism_config_of(model) -> Optional[PrismConfig]:
    state = getattr(model, "_prism_state", None)
    return None if state is None else model._prism_config

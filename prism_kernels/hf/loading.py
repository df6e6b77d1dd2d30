"""Load a pretrained transformers model with Prism already enabled.

    import prism_kernels.hf as phf
    from transformers import AutoModel
    model = phf.from_pretrained(AutoModel, "path/or/hub-id", num_partitions=2, compression_rate=4)

is `model_class.from_pretrained(path, **hf_kwargs)` followed by
`enable_prism(model, ...)`, with the settings checked before any weight is read.
The model loads with its usual attention implementation, so `disable_prism`
gives back exactly the stock model. Without P and CR / m, the settings saved in
the checkpoint's config.json under "prism" are used (a model saved after
`config.prism = PrismConfig(...).to_dict()`, read from config.json before any
weight); with neither, ValueError names the missing arguments and says how to give them.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..anchors import DEFAULT_ANCHOR_BUDGET, DEFAULT_ANCHORS, DEFAULT_SEGMENTS
from ..config import DEFAULT_AVERAGING, PrismConfig
from .patch import enable_prism

MISSING_SETTINGS = (
    "Prism needs its settings: the number of simulated devices P and the compression rate CR "
    "(or m means per partition). Give them with prism_kernels.hf.from_pretrained(ModelClass, path, "
    "num_partitions=P, compression_rate=CR), or prism_kernels.hf.enable_prism(model, num_partitions=P, "
    "compression_rate=CR) on a loaded model, or set config.prism = PrismConfig(...).to_dict() before "
    "building it with attn_implementation=\"prism\"")


def from_pretrained(model_class, path, *, num_partitions: Optional[int] = None,
                    compression_rate: Optional[float] = None, num_means: Optional[int] = None,
                    averaging: str = DEFAULT_AVERAGING, backend: str = "auto",
                    partition_weights: Optional[Sequence[float]] = None, anchors: str = DEFAULT_ANCHORS,
                    segments: str = DEFAULT_SEGMENTS, anchor_budget: str = DEFAULT_ANCHOR_BUDGET,
                    prism_config: Optional[PrismConfig] = None, allow_untested: bool = False, **hf_kwargs):
    """`model_class.from_pretrained(path, **hf_kwargs)` with Prism enabled; returns the model.

    model_class: a transformers model class (BertModel, AutoModel, ...). Prism settings
    as in enable_prism (num_partitions with compression_rate or num_means, averaging,
    backend, partition_weights, anchors, segments, anchor_budget) or a ready PrismConfig / dict as `prism_config`; when
    none are given, the checkpoint's saved config.prism. Every other keyword goes to
    transformers (dtype, local_files_only, ...; `config=` is transformers' config).
    """
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"from_pretrained: model_class must be a transformers model class "
                        f"(BertModel, AutoModel, ...), got {model_class!r}")
    given = num_partitions is not None or compression_rate is not None or num_means is not None
    if prism_config is not None and given:
        raise ValueError("from_pretrained: give either prism_config or num_partitions / compression_rate / "
                         "num_means, not both")
    settings = None
    if prism_config is not None:
        settings = PrismConfig.from_any(prism_config)
    elif given:
        missing = [name for name, v in (("num_partitions", num_partitions),
                                        ("compression_rate (or num_means)",
                                         compression_rate if num_means is None else num_means)) if v is None]
        if missing:
            raise ValueError(f"from_pretrained: missing {' and '.join(missing)}. {MISSING_SETTINGS}")
        settings = PrismConfig(num_partitions=num_partitions, compression_rate=compression_rate,
                               num_means=num_means, averaging=averaging, backend=backend,
                               partition_weights=partition_weights, anchors=anchors, segments=segments,
                               anchor_budget=anchor_budget)
    else:
        # the checkpoint's config.json only (no weight read yet): its saved settings or the error
        saved = getattr(_hf_config(path, hf_kwargs), "prism", None)
        if saved is None:
            raise ValueError(f"from_pretrained: missing num_partitions and compression_rate (or num_means), and "
                             f"the checkpoint's config has no saved \"prism\" settings. {MISSING_SETTINGS}")
        settings = PrismConfig.from_any(saved)
    if hf_kwargs.get("attn_implementation") == "prism":
        hf_kwargs.pop("attn_implementation")     # enable_prism switches it; disable_prism restores the default
    model = model_class.from_pretrained(path, **hf_kwargs)
    return enable_prism(model, config=settings, allow_untested=allow_untested)


# keywords of model_class.from_pretrained that also say where config.json is
_CONFIG_LOCATION = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                    "proxies", "trust_remote_code")


def _hf_config(path, hf_kwargs):
    """The transformers config the model will be built with, without loading the model."""
    from transformers import AutoConfig, PretrainedConfig
    config = hf_kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        return config
    where = {k: hf_kwargs[k] for k in _CONFIG_LOCATION if k in hf_kwargs}
    return AutoConfig.from_pretrained(config if config is not None else path, **where)

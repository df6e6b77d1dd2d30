"""Load a pretrained transformers model with Prism already enabled.

    import prism_kernels.hf as phf
    from transformers import AutoModel
    model = phf.from_pretrained(AutoModel, "path/or/hub-id", num_partitions=2, compression_rate=4)

is `model_class.from_pretrained(path, **hf_kwargs)` followed by
`enable_prism(model, ...)`, with the settings checked before any weight is read.
The model loads with its usual attention implementation, so `disable_prism`
gives back exactly the stock model. Without P and CR / m, the settings saved in
the checkpoint's config.json under "prism" are used (a model saved after
`config.prism = PrismConfig(...).to_dict()`); with neither, ValueError says how to
give them.
"""
from __future__ import annotations

from typing import Optional, Sequence

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
                    partition_weights: Optional[Sequence[float]] = None,
                    prism_config: Optional[PrismConfig] = None, allow_untested: bool = False, **hf_kwargs):
    """`model_class.from_pretrained(path, **hf_kwargs)` with Prism enabled; returns the model.

    model_class: a transformers model class (BertModel, AutoModel, ...). Prism settings
    as in enable_prism (num_partitions with compression_rate or num_means, averaging,
    backend, partition_weights) or a ready PrismConfig / dict as `prism_config`; when
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
        if num_partitions is None or (compression_rate is None and num_means is None):
            raise ValueError(MISSING_SETTINGS)
        settings = PrismConfig(num_partitions=num_partitions, compression_rate=compression_rate,
                               num_means=num_means, averaging=averaging, backend=backend,
                               partition_weights=partition_weights)
    if hf_kwargs.get("attn_implementation") == "prism":
        hf_kwargs.pop("attn_implementation")     # enable_prism switches it; disable_prism restores the default
    model = model_class.from_pretrained(path, **hf_kwargs)
    if settings is None:
        saved = getattr(getattr(model, "config", None), "prism", None)
        if saved is None:
            raise ValueError(MISSING_SETTINGS)
        settings = PrismConfig.from_any(saved)
    return enable_prism(model, config=settings, allow_untested=allow_untested)

"""Prism inside Hugging Face transformers models, simulated on one machine.

    import prism_kernels.hf as phf
    phf.enable_prism(model, num_partitions=2, compression_rate=4)   # or num_means=m
    out = model(**inputs)                                            # P devices simulated
    phf.disable_prism(model)                                         # the stock model again

    model = phf.from_pretrained(AutoModel, path, num_partitions=2, compression_rate=4)   # at load time

Importing this module registers attn_implementation="prism" (AttentionInterface
and AttentionMaskInterface); a model built with it reads its settings from
`config.prism` (a PrismConfig or its dict). See docs/huggingface.md.

Modules: attention (the simulation, one segment plan per sequence length from
PrismConfig.plan), averaging (what the means are taken of), masks (padding),
patch (enable/disable, which models are supported), loading (from_pretrained),
generation (the decoding device's KV cache for generate: PrismCache, cache_rows),
accounting (per-device tokens, bytes and FLOPs of a
real forward). PrismConfig is prism_kernels.config.PrismConfig.
"""
from ..config import PrismConfig
from .attention import prism_attention_forward, simulate_prism
from .generation import DECODE_MODES, CacheReport, PrismCache, cache_rows
from .masks import prism_mask
from .loading import from_pretrained
from .patch import disable_prism, enable_prism, prism_config_of, register, supported_model_types

register()

__all__ = ["PrismConfig", "enable_prism", "disable_prism", "from_pretrained", "prism_config_of", "register",
           "supported_model_types", "PrismCache", "CacheReport", "cache_rows", "DECODE_MODES",
           "prism_attention_forward", "prism_mask", "simulate_prism"]

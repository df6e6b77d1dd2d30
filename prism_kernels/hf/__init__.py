"""Prism inside Hugging Face transformers models, simulated on one machine.

    import prism_kernels.hf as phf
    phf.enable_prism(model, num_partitions=2, compression_rate=4)   # or num_means=m
    out = model(**inputs)                                            # P devices simulated
    phf.disable_prism(model)                                         # the stock model again

Importing this module registers attn_implementation="prism" (AttentionInterface
and AttentionMaskInterface); a model built with it reads its settings from
`config.prism` (a PrismConfig or its dict). See docs/huggingface.md.

Modules: config (PrismConfig), attention (the simulation; `assemble_device_kv`
is the seam shared with the distributed runtime), masks (padding), patch
(enable/disable), block_output (the paper's averaging for pre-LN models),
accounting (per-device tokens, bytes and FLOPs of a real forward).
"""
from .attention import assemble_device_kv, prism_attention_forward, simulate_prism
from .config import PrismConfig
from .masks import prism_mask
from .patch import disable_prism, enable_prism, prism_config_of
from .registry import register

register()

__all__ = ["PrismConfig", "enable_prism", "disable_prism", "prism_config_of", "register",
           "prism_attention_forward", "prism_mask", "simulate_prism", "assemble_device_kv"]

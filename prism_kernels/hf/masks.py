"""The `prism` entry of transformers' AttentionMaskInterface.

transformers only builds a padding mask for attention implementations that are
registered in AttentionMaskInterface; for any other name `create_causal_mask` /
`create_bidirectional_mask` return None and padding silently disappears. This
function is registered under "prism" next to the attention function.

What it returns is deliberately small: None when no key is padding, else the
boolean key-padding mask shaped [B, 1, 1, kv_length] (True = real token). It
broadcasts like any HF 4-D mask, so model code that slices or moves masks keeps
working. Causality is *not* encoded here: the Prism attention applies the
partition-aware causal rule (docs/method.md, "Causal mask") itself from the module's `is_causal`,
so the mask only has to say which tokens exist.
"""
from __future__ import annotations

from typing import Optional

import torch


def prism_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    if attention_mask is None:
        return None
    pad = attention_mask.to(torch.bool)
    if pad.dim() != 2:
        raise ValueError(f"prism mask: expected a 2-D padding mask [B, kv_length], got {tuple(pad.shape)}")
    missing = kv_length + kv_offset - pad.shape[-1]
    if missing > 0:   # same convention as transformers.masking_utils.prepare_padding_mask
        pad = torch.nn.functional.pad(pad, (0, missing))
    pad = pad[:, kv_offset:kv_offset + kv_length]
    # "no padding" from the values needs the data; under torch.compile the mask is kept
    # (an all-ones mask is then just a padded batch without pads, handled by the attention)
    if not torch.compiler.is_compiling() and bool(pad.all()):
        return None
    return pad[:, None, None, :].expand(batch_size, 1, 1, kv_length)


def key_valid_from_mask(attention_mask, batch: int, kv_length: int) -> Optional[torch.Tensor]:
    """Which keys are real tokens, [B, Nk] bool, or None when all are.

    Accepts what the prism mask function returns, a 2-D [B, Nk] padding mask,
    or any 4-D HF mask (bool: True = visible; float: 0 = visible, large negative
    = masked): a key is real when some query may see it. Patterns other than
    padding (and causality, which Prism applies itself) are not representable
    under Prism and are reduced to this per-key view.
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 2:
        valid = m.to(torch.bool)
    elif m.dim() == 4:
        vis = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        valid = vis.any(dim=1).any(dim=1)
    else:
        raise ValueError(f"prism attention: unsupported attention_mask shape {tuple(m.shape)}")
    valid = valid[..., -kv_length:].expand(batch, kv_length)
    if bool(valid.all()):
        return None
    return valid

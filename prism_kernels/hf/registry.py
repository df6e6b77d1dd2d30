"""Registers "prism" in transformers' AttentionInterface and AttentionMaskInterface.

Both are needed: without the mask entry transformers builds no padding mask for
an unknown implementation name and padded tokens would silently be attended to.
"""
from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .attention import prism_attention_forward
    from .masks import prism_mask

    AttentionInterface.register("prism", prism_attention_forward)
    AttentionMaskInterface.register("prism", prism_mask)
    _done = True

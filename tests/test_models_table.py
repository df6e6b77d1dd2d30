"""The table of model types (prism_kernels.models): every entry builds a tiny model,
its K/V projection equals what the model's own attention computes, and running
its blocks one by one (embed, run_block, final_norm, head) equals the stock model."""
from __future__ import annotations

import pytest
import torch

from prism_kernels.models import MODEL_TYPES, TABLE, lookup

FAMILIES = ("bert", "roberta", "vit", "dinov2", "gpt2", "llama", "qwen2")
_CAPTURED = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    _CAPTURED.append((module, key.detach(), value.detach()))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("prism_test_capture", _capture_attention)
    AttentionMaskInterface.register("prism_test_capture", sdpa_mask)


def test_table_lists_the_families():
    assert set(FAMILIES) == set(MODEL_TYPES)
    kinds = {t: TABLE[t].kind for t in FAMILIES}
    assert kinds == {"bert": "encoder", "roberta": "encoder", "vit": "vision", "dinov2": "vision",
                     "gpt2": "causal", "llama": "causal", "qwen2": "causal"}
    assert [t for t in FAMILIES if TABLE[t].rotary] == ["llama", "qwen2"]


def test_lookup_errors_name_the_supported_types():
    import transformers as tf
    with pytest.raises(ValueError, match="supported model types: bert, roberta"):
        lookup(tf.T5Config())
    with pytest.raises(ValueError, match="unsupported model type 'nope'"):
        lookup("nope")
    assert lookup(tf.GPT2Config()).model_type == "gpt2"


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_projection_equals_the_models_own(family):
    _register()
    entry = lookup(family)
    model = entry.build_model("tiny", seed=0)
    assert lookup(model) is entry and lookup(model.config) is entry
    cfg = model.config
    if family == "qwen2":   # Q/K/V bias
        assert model.model.layers[0].self_attn.k_proj.bias is not None
    inputs = entry.make_input(cfg, 9, seed=0)
    layers = entry.layers(model)
    assert len(layers) == cfg.num_hidden_layers
    attn_inputs = {}
    hooks = [l.attention.register_forward_pre_hook(
        lambda mod, a, kw, i=l.index: attn_inputs.__setitem__(i, a[0] if a else kw["hidden_states"]),
        with_kwargs=True) for l in layers]
    block_inputs = {}
    hooks += [l.block.register_forward_pre_hook(
        lambda mod, a, kw, i=l.index: block_inputs.__setitem__(i, a[0] if a else kw["hidden_states"]),
        with_kwargs=True) for l in layers]
    model.set_attn_implementation("prism_test_capture")
    _CAPTURED.clear()
    try:
        entry.stock_forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(_CAPTURED) == len(layers)
    N = entry.n_tokens(model, inputs)
    pos = torch.arange(N)
    with torch.no_grad():
        for layer, (mod, k_ref, v_ref) in zip(layers, _CAPTURED):
            assert mod is layer.attention
            x = attn_inputs[layer.index]
            k, v = entry.kv(layer.block, x, pos, model)
            assert k.shape == (1, entry.num_kv_heads(cfg), N, entry.head_dim(cfg))
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
            # the Layer view: pre_norm(block input) is the attention input; kv without rotary
            norm = layer.pre_norm or (lambda t: t)
            torch.testing.assert_close(norm(block_inputs[layer.index]), x)
            k2, v2 = layer.kv(x)
            torch.testing.assert_close(v2, v_ref, atol=1e-5, rtol=1e-5)
            if not layer.rotary:
                torch.testing.assert_close(k2, k_ref, atol=1e-5, rtol=1e-5)
            # the key projection module: the unrotated keys as rows [B, N, Hkv*d]
            if family == "gpt2":
                assert layer.key_proj is None          # fused into c_attn
            else:
                rows = layer.key_proj(x)
                assert rows.shape == (1, N, entry.num_kv_heads(cfg) * entry.head_dim(cfg))
                torch.testing.assert_close(rows.view(1, N, -1, entry.head_dim(cfg)).transpose(1, 2), k2,
                                           atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_one_by_one_equal_the_stock_model(family):
    entry = lookup(family)
    model = entry.build_model("tiny", seed=0)
    model.set_attn_implementation("sdpa")
    inputs = entry.make_input(model.config, 7, seed=3)
    ref_hidden, ref_head = entry.stock_forward(model, inputs)
    with torch.no_grad():
        h = entry.embed(model, inputs)
        pos = torch.arange(h.shape[1])
        if entry.input_kind == "text":   # embedding a slice at its global positions
            torch.testing.assert_close(entry.embed(model, inputs[:, 3:], pos[3:]), h[:, 3:])
        for block in entry.blocks(model):
            h = entry.run_block(model, block, h, pos)
        h = entry.final_norm(model, h)
        head = entry.head(model, h) if entry.causal else entry.head(model, h[:, :1])
    torch.testing.assert_close(h, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, ref_head, atol=1e-5, rtol=1e-5)


def test_build_config_sizes():
    for fam in FAMILIES:
        e = lookup(fam)
        assert e.build_config("tiny").initializer_range == 0.3
        assert e.build_config("base").hidden_size == 768
    with pytest.raises(ValueError, match="unknown size"):
        lookup("bert").build_config("huge")


@pytest.mark.parametrize("family,processor", [("vit", "ViTImageProcessor"), ("dinov2", "BitImageProcessor")])
def test_uint8_pixels_normalised_as_the_image_processor(family, processor):
    """ModelType.pixel_values of 8-bit pixels equals what the model's Hugging Face image
    processor gives (rescale by 1/255, normalise; no resize or crop: the image already has
    the model's size)."""
    import numpy as np
    import transformers as tf
    from prism_kernels.models import lookup
    e = lookup(family)
    cfg = e.build_config("tiny")
    x = e.make_input(cfg, pixels="uint8", seed=3, batch=2)
    assert x.dtype == torch.uint8 and int(x.max()) > 200 and int(x.min()) < 50
    kw = dict(do_resize=False)
    if processor == "BitImageProcessor":   # DINOv2's processor: ImageNet statistics, crop off here
        kw.update(do_center_crop=False, do_convert_rgb=False, image_mean=[0.485, 0.456, 0.406],
                  image_std=[0.229, 0.224, 0.225])
    proc = getattr(tf, processor)(**kw)
    want = proc([np.asarray(img) for img in x], input_data_format="channels_first",
                return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(e.pixel_values(x), want, atol=1e-6, rtol=1e-6)
    f = e.make_input(cfg)                          # float pixel_values pass through untouched
    assert e.pixel_values(f) is f


def test_pixels_uint8_refused_for_text():
    from prism_kernels.models import lookup
    e = lookup("bert")
    with pytest.raises(ValueError, match="applies to image models"):
        e.make_input(e.build_config("tiny"), 8, pixels="uint8")
    with pytest.raises(ValueError, match="pixels must be one of"):
        e.make_input(e.build_config("tiny"), 8, pixels="int8")

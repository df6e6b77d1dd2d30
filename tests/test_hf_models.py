"""Prism inside Hugging Face models (random configs, no download).

What is checked, per family (BERT, BERT classifier, ViT, ViT classifier, GPT-2 LM,
Llama with grouped-query heads, DINOv2):
  * P = 1, and CR = 1 (every mean is one token), reproduce the stock model
    within fp32 tolerance, with and without padding;
  * with compression the output differs, and disable_prism gives back the
    stock outputs bit for bit (and the model's config);
  * on average the error grows with CR.
"""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, Dinov2Config, Dinov2Model,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification, ViTModel)

import prism_kernels.hf as phf

# initializer_range 0.2 (not 0.02): attention far from uniform, so compression shows.
H = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
         initializer_range=0.2)
VOCAB = 100


def _bert(cls=BertModel):
    return cls(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **H))


def _vit(cls=ViTModel):
    return cls(ViTConfig(image_size=32, patch_size=8, **H))          # 16 patches + CLS = 17 tokens


def _dinov2():
    return Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, mlp_ratio=2,
                                    initializer_range=0.2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      initializer_range=0.2, bos_token_id=0, eos_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=2,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0, **H))


def _text_inputs(padded: bool, left: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 19), generator=g)
    am = torch.ones_like(ids)
    if padded:
        if left:
            am[1, :6] = 0
            am[2, :13] = 0
        else:
            am[1, 13:] = 0
            am[2, 6:] = 0
    return dict(input_ids=ids, attention_mask=am), am


def _image_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g)), None


def _out(model, inputs):
    o = model(**inputs)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


MODELS = {
    "bert": (_bert, lambda: _text_inputs(True)),
    "bert_cls": (lambda: _bert(BertForSequenceClassification), lambda: _text_inputs(True)),
    "vit": (_vit, _image_inputs),
    "vit_cls": (lambda: _vit(ViTForImageClassification), _image_inputs),
    "dinov2": (_dinov2, _image_inputs),
    "gpt2_right_pad": (_gpt2, lambda: _text_inputs(True)),
    "gpt2_left_pad": (_gpt2, lambda: _text_inputs(True, left=True)),
    "llama_gqa": (_llama, lambda: _text_inputs(True, left=True)),
    "gpt2_no_pad": (_gpt2, lambda: _text_inputs(False)),
    "bert_no_pad": (_bert, lambda: _text_inputs(False)),
}


def _masked_err(a, b, am):
    d = (a - b).abs()
    if am is not None and a.dim() == 3:       # per-token outputs: only real tokens count
        d = d * am[..., None]
    return d.max().item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_cases_and_disable(name):
    """P=1 and CR=1 (also m >= n) equal the stock model; compression differs; disable restores."""
    make, inputs_fn = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    inputs, am = inputs_fn()
    impl_before = model.config._attn_implementation
    with torch.no_grad():
        ref = _out(model, inputs)
        scale = ref.abs().max().item()
        tol = 1e-5 * scale
        for kw in (dict(num_partitions=1, compression_rate=8.0), dict(num_partitions=3, compression_rate=1.0),
                   dict(num_partitions=2, num_means=64)):
            phf.enable_prism(model, **kw)
            assert model.config._attn_implementation == "prism"
            assert _masked_err(_out(model, inputs), ref, am) <= tol, kw
        phf.enable_prism(model, num_partitions=3, compression_rate=4.0)
        assert _masked_err(_out(model, inputs), ref, am) > 10 * tol
        phf.disable_prism(model)
        assert model.config._attn_implementation == impl_before
        assert not any("_prism_config" in m.__dict__ for m in model.modules())
        assert torch.equal(_out(model, inputs), ref)


@pytest.mark.parametrize("name", ["bert_no_pad", "gpt2_no_pad", "vit", "llama_gqa"])
def test_error_grows_with_compression(name):
    """Mean relative error over the batch at P=2 is ~0 at CR=1 and grows with CR (2 < 4 < 16)."""
    make, inputs_fn = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    inputs, am = inputs_fn()
    errs = []
    with torch.no_grad():
        ref = _out(model, inputs)
        for cr in (1.0, 2.0, 4.0, 16.0):
            phf.enable_prism(model, num_partitions=2, compression_rate=cr)
            d = (_out(model, inputs) - ref)
            if am is not None and d.dim() == 3:
                d = d * am[..., None]
            errs.append(d.norm().item() / ref.norm().item())
    assert errs[0] < 1e-5
    assert errs[1] < errs[2] < errs[3], errs

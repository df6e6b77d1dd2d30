"""What a user of prism_kernels.hf meets first: loading, settings, clear errors.

* prism_kernels.hf.from_pretrained(cls, path, num_partitions=P, compression_rate=CR)
  gives the model with Prism on (same outputs as from_pretrained + enable_prism);
* the config route (config.prism + attn_implementation="prism") is reported by
  prism_config_of, also after save_pretrained / from_pretrained;
* attn_implementation="prism" without settings fails with one message that says
  how to give P and CR;
* enable_prism refuses invalid settings (backend), non-transformers models and
  model types outside prism_kernels.models.MODEL_TYPES (T5), unless allow_untested;
* output_attentions=True raises instead of returning empty attentions, under
  enable_prism and on the config route (BERT, GPT-2, Llama).
"""
import pytest
import torch
from transformers import (AutoModel, BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel, T5Config,
                          T5Model)

import prism_kernels.hf as phf
from prism_kernels.config import PrismConfig
from prism_kernels.models import MODEL_TYPES

VOCAB = 60


def _bert_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


@pytest.fixture
def saved_bert(tmp_path):
    torch.manual_seed(0)
    BertModel(_bert_config()).eval().save_pretrained(tmp_path)
    return tmp_path


def _ids(B=2, N=10):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (B, N), generator=g)


def _out(model, **kw):
    with torch.no_grad():
        return model(input_ids=_ids(), **kw).last_hidden_state


def test_from_pretrained_enables_prism(saved_bert):
    model = phf.from_pretrained(BertModel, saved_bert, num_partitions=3, compression_rate=4)
    cfg = phf.prism_config_of(model)
    assert cfg == PrismConfig(num_partitions=3, compression_rate=4.0)
    ref = phf.enable_prism(BertModel.from_pretrained(saved_bert).eval(), num_partitions=3, compression_rate=4)
    torch.testing.assert_close(_out(model.eval()), _out(ref), rtol=0, atol=0)
    stock = _out(BertModel.from_pretrained(saved_bert).eval())
    assert (_out(model) - stock).abs().max() > 1e-5                 # CR = 4 compresses
    phf.disable_prism(model)
    assert phf.prism_config_of(model) is None
    torch.testing.assert_close(_out(model), stock, rtol=0, atol=0)   # the stock model again


def test_from_pretrained_auto_class_and_options(saved_bert):
    model = phf.from_pretrained(AutoModel, saved_bert, num_partitions=2, num_means=2,
                                averaging="block_input", dtype=torch.float32)
    assert isinstance(model, BertModel)
    assert phf.prism_config_of(model) == PrismConfig(num_partitions=2, num_means=2, averaging="block_input")
    model = phf.from_pretrained(BertModel, saved_bert,
                                prism_config=PrismConfig(num_partitions=2, compression_rate=1))
    assert phf.prism_config_of(model).compression_rate == 1


def test_from_pretrained_cr1_is_exact(saved_bert):
    stock = _out(BertModel.from_pretrained(saved_bert).eval())
    model = phf.from_pretrained(BertModel, saved_bert, num_partitions=3, compression_rate=1).eval()
    torch.testing.assert_close(_out(model), stock, rtol=1e-5, atol=1e-5)


def test_from_pretrained_needs_settings(saved_bert):
    with pytest.raises(ValueError, match=r"num_partitions=P, compression_rate=CR"):
        phf.from_pretrained(BertModel, saved_bert)
    with pytest.raises(ValueError, match=r"num_partitions=P, compression_rate=CR"):
        phf.from_pretrained(BertModel, saved_bert, num_partitions=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        phf.from_pretrained(BertModel, saved_bert, num_partitions=2, compression_rate=2, backend="foo")
    with pytest.raises(ValueError, match="not both"):
        phf.from_pretrained(BertModel, saved_bert, num_partitions=2,
                            prism_config=PrismConfig(num_partitions=2, compression_rate=2))


def test_attn_implementation_prism_without_settings_says_how(saved_bert):
    model = BertModel.from_pretrained(saved_bert, attn_implementation="prism")
    assert phf.prism_config_of(model) is None
    with pytest.raises(ValueError, match=r"needs Prism settings.*num_partitions=P, compression_rate=CR"):
        _out(model)


def test_config_route_reported(saved_bert, tmp_path):
    config = _bert_config()
    config.prism = PrismConfig(num_partitions=3, compression_rate=2).to_dict()
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="prism").eval()
    assert phf.prism_config_of(model) == PrismConfig(num_partitions=3, compression_rate=2.0)
    out = _out(model)
    ref = phf.enable_prism(AutoModel.from_config(_bert_config()).eval(), num_partitions=3, compression_rate=2)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, _out(ref), rtol=1e-6, atol=1e-6)
    # saved with its settings: plain transformers loading and phf.from_pretrained both find them
    d = tmp_path / "with_prism"
    model.save_pretrained(d)
    again = BertModel.from_pretrained(d, attn_implementation="prism").eval()
    assert phf.prism_config_of(again) == PrismConfig(num_partitions=3, compression_rate=2.0)
    torch.testing.assert_close(_out(again), out, rtol=1e-6, atol=1e-6)
    loaded = phf.from_pretrained(BertModel, d).eval()
    assert phf.prism_config_of(loaded) == PrismConfig(num_partitions=3, compression_rate=2.0)
    # an eager model with a leftover config.prism does not run Prism
    assert phf.prism_config_of(BertModel.from_pretrained(d, attn_implementation="eager")) is None


def test_enable_prism_rejects_bad_wire_dtype_at_once():
    model = BertModel(_bert_config()).eval()
    for bad in ("fp8", "float16", None):
        with pytest.raises(ValueError, match=r"wire_dtype must be one of fp32, fp16, bf16, got"):
            phf.enable_prism(model, num_partitions=2, compression_rate=2, wire_dtype=bad)
    assert phf.prism_config_of(model) is None


def test_enable_prism_rejects_bad_backend_at_once():
    model = BertModel(_bert_config()).eval()
    with pytest.raises(ValueError, match="backend must be one of"):
        phf.enable_prism(model, num_partitions=2, compression_rate=2, backend="foo")
    assert phf.prism_config_of(model) is None and model.config._attn_implementation != "prism"
    with pytest.raises(ValueError, match="backend must be one of"):
        phf.enable_prism(model, config={"num_partitions": 2, "compression_rate": 2, "backend": "foo"})


def test_enable_prism_rejects_unsupported_models():
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear is not a transformers model.*bert"):
        phf.enable_prism(torch.nn.Linear(4, 4), num_partitions=2, compression_rate=2)
    t5 = T5Model(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    impl = t5.config._attn_implementation
    with pytest.raises(ValueError) as e:
        phf.enable_prism(t5, num_partitions=2, compression_rate=2)
    msg = str(e.value)
    assert "model type 't5'" in msg and "allow_untested=True" in msg
    assert all(mt in msg for mt in MODEL_TYPES)
    assert t5.config._attn_implementation == impl and phf.prism_config_of(t5) is None   # untouched
    assert phf.supported_model_types() == MODEL_TYPES


def test_allow_untested_escape_hatch():
    t5 = T5Model(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    phf.enable_prism(t5, num_partitions=2, compression_rate=2, allow_untested=True)
    assert phf.prism_config_of(t5).num_partitions == 2
    phf.disable_prism(t5)
    assert phf.prism_config_of(t5) is None


def test_output_attentions_refused():
    model = BertModel._from_config(_bert_config(), attn_implementation="eager").eval()
    phf.enable_prism(model, num_partitions=2, compression_rate=2)
    with pytest.raises(ValueError, match="does not materialise attention weights"):
        _out(model, output_attentions=True)
    assert _out(model, output_attentions=False).shape == (2, 10, 32)
    phf.disable_prism(model)
    with torch.no_grad():
        out = model(input_ids=_ids(), output_attentions=True)
    assert len(out.attentions) == 2                    # the stock (eager) model again


def test_output_attentions_in_config_refused():
    model = BertModel(_bert_config(output_attentions=True)).eval()       # an eager model asked for weights
    phf.enable_prism(model, num_partitions=2, compression_rate=2)
    with pytest.raises(ValueError, match="output_attentions=True is not supported under Prism"):
        _out(model)
    assert _out(model, output_attentions=False).shape == (2, 10, 32)


def _gpt2_config(**kw):
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, **kw)


def _llama_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, **kw)


@pytest.mark.parametrize("make_config,cls", [(_bert_config, BertModel), (_gpt2_config, GPT2Model),
                                             (_llama_config, LlamaModel)], ids=["bert", "gpt2", "llama"])
def test_output_attentions_refused_on_the_config_route(make_config, cls):
    """attn_implementation="prism" at construction: no enable_prism hook, the entry point refuses."""
    config = make_config()
    config.prism = PrismConfig(num_partitions=2, compression_rate=2).to_dict()
    model = cls._from_config(config, attn_implementation="prism").eval()
    with pytest.raises(ValueError, match="output_attentions=True is not supported under Prism"):
        _out(model, output_attentions=True)
    assert _out(model).shape == (2, 10, 32)
    with torch.no_grad():     # other collected outputs still work
        assert len(model(input_ids=_ids(), output_hidden_states=True).hidden_states) == 3


def test_from_pretrained_names_missing_settings_before_loading_weights(tmp_path, monkeypatch):
    _bert_config().save_pretrained(tmp_path)          # config.json only: loading weights would fail
    loads = []
    monkeypatch.setattr(BertModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or BertModel(_bert_config())))
    with pytest.raises(ValueError, match=r"missing num_partitions and compression_rate \(or num_means\).*no saved "
                                         r"\"prism\" settings"):
        phf.from_pretrained(BertModel, tmp_path)
    with pytest.raises(ValueError, match=r"missing compression_rate \(or num_means\)\."):
        phf.from_pretrained(BertModel, tmp_path, num_partitions=2)
    with pytest.raises(ValueError, match=r"missing num_partitions\."):
        phf.from_pretrained(BertModel, tmp_path, compression_rate=4)
    assert loads == []                                 # no model was loaded
    # settings saved in config.json (or a config= passed on) are read before loading
    config = _bert_config()
    config.prism = PrismConfig(num_partitions=3, compression_rate=2).to_dict()
    config.save_pretrained(tmp_path)
    model = phf.from_pretrained(BertModel, tmp_path)
    assert len(loads) == 1 and phf.prism_config_of(model) == PrismConfig(num_partitions=3, compression_rate=2.0)

"""torch.compile of Prism-enabled Hugging Face models (tiny random models, CPU).

* Unpadded inputs (attention_mask=None): torch.compile(model, fullgraph=True)
  traces the whole forward (the layout of the stacked devices depends on the
  shape only), matches eager to 1e-5, and new inputs of the same shape do not
  recompile.
* Padded inputs: the groups and plans depend on the mask's values, so the Prism
  attention of each layer runs eagerly (torch.compiler.disable, a clean graph
  break); default mode matches eager, fullgraph=True refuses.
"""
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import prism_kernels.hf as phf

VOCAB = 100


def _bert():
    return BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                initializer_range=0.2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=0.2, bos_token_id=0, eos_token_id=0))


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# P=3 over 19 tokens: devices of different sizes (padding slots through positions)
@pytest.mark.parametrize("make,P,cr", [(_bert, 2, 4.0), (_gpt2, 2, 4.0), (_gpt2, 3, 2.0)],
                         ids=["bert_P2", "gpt2_P2", "gpt2_P3"])
def test_fullgraph_matches_eager_without_recompiling(make, P, cr):
    torch.manual_seed(0)
    model = make().eval()
    phf.enable_prism(model, num_partitions=P, compression_rate=cr)
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for i in range(3):                       # 3 different inputs of one shape
            ids = torch.randint(1, VOCAB, (3, 19), generator=g)
            ref = _out(model(input_ids=ids))
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = _out(compiled(input_ids=ids))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_padded_inputs_break_the_graph_cleanly():
    torch.manual_seed(0)
    model = _bert().eval()
    phf.enable_prism(model, num_partitions=2, compression_rate=4.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 19), generator=g)
    am = torch.ones_like(ids)
    am[1, 13:] = 0
    am[2, 6:] = 0
    compiled = torch.compile(model)
    with torch.no_grad():
        for mask in (am, torch.ones_like(ids)):   # padded, and an all-ones mask
            torch.testing.assert_close(_out(compiled(input_ids=ids, attention_mask=mask)),
                                       _out(model(input_ids=ids, attention_mask=mask)), atol=1e-5, rtol=1e-5)
        breaks = torch._dynamo.utils.counters["graph_break"]
        assert breaks and all("torch.compiler.disable" in reason for reason in breaks), dict(breaks)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="disable"):
            torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=am)


def test_varying_shapes_with_dynamic_false():
    """Plans need concrete sizes: dynamic=False gives one graph per shape (dynamo only)."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    phf.enable_prism(model, num_partitions=2, compression_rate=4.0)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for shape in [(3, 19), (2, 23), (3, 19)]:
            ids = torch.randint(1, VOCAB, shape)
            torch.testing.assert_close(_out(compiled(input_ids=ids)), _out(model(input_ids=ids)),
                                       atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_block_input_averaging_traces_fullgraph(make):
    """averaging='block_input' (hooks stash the block input): one graph too (dynamo only)."""
    torch.manual_seed(0)
    model = make().eval()
    phf.enable_prism(model, num_partitions=2, compression_rate=4.0, averaging="block_input")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids = torch.randint(1, VOCAB, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled(input_ids=ids)), _out(model(input_ids=ids)),
                                   atol=1e-5, rtol=1e-5)

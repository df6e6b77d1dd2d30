"""generate() from a Prism prefill (prism_kernels/hf/generation.py).

The prompt runs on P simulated devices; the last device decodes from a PrismCache:
"prism" (own rows + received segment means, with counts), "exact" / "voltage" (every
prompt row). Checked on tiny random Llama and GPT-2 models:
  * CR = 1: every mode reproduces stock greedy generation (tokens and logits);
  * CR > 1, prism: every step's logits equal a no-cache Prism forward of prompt +
    generated tokens in which the last partition is extended by the generated tokens
    (what decoding on the last device means), and the cache holds n_P + sum m_j rows;
  * one decode step of layer 0 against python_ref (keys rebuilt from a stock cache);
  * batched left-padded prompts, sampling, disable_prism, bad `decode`.
"""
import math
from dataclasses import dataclass

import pytest
import torch

import prism_kernels.hf as phf
import python_ref
from prism_kernels.anchors import resolve
from prism_kernels.config import PrismConfig
from prism_kernels.hf import generation
from prism_kernels.models import build_model
from prism_kernels.plan import make_plan

N, NEW, VOCAB_MAX = 20, 8, 90


def _ids(n=N, seed=1, batch=1):
    return torch.randint(1, VOCAB_MAX, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(ids, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1), out


def _sizes(n, P):
    base, rem = divmod(n, P)
    return [base + 1 if i < rem else base for i in range(P)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("decode", ["exact", "voltage", "prism"])
def test_cr1_reproduces_stock_generation(model_type, P, decode):
    model = build_model(model_type)
    ids = _ids()
    ref_tok, ref_logits, _ = _generate(model, ids)
    phf.enable_prism(model, num_partitions=P, compression_rate=1, decode=decode)
    tok, logits, out = _generate(model, ids)
    assert isinstance(out.cache, phf.PrismCache) and out.cache.decode == decode
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    rep = phf.cache_rows(out.cache)
    assert rep.bytes == rep.stock_bytes                 # CR = 1 keeps every row
    # voltage gathered every earlier partition's K/V rows: (N - n_P) rows, K and V, all layers
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    row = 2 * kv_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    expected = (N - _sizes(N, P)[-1]) * row * cfg.num_hidden_layers if decode == "voltage" else 0
    assert rep.gathered_bytes == expected


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_exact_equals_voltage_at_cr4(model_type):
    """Same rows, same output: the two differ only in what is accounted."""
    model = build_model(model_type)
    ids = _ids()
    res = {}
    for decode in ("exact", "voltage"):
        phf.enable_prism(model, num_partitions=3, compression_rate=4, decode=decode)
        res[decode] = _generate(model, ids)
    assert torch.equal(res["exact"][0], res["voltage"][0])
    assert torch.equal(res["exact"][1], res["voltage"][1])
    assert phf.cache_rows(res["voltage"][2].cache).gathered_bytes > 0
    assert phf.cache_rows(res["exact"][2].cache).gathered_bytes == 0


@dataclass(frozen=True)
class _ExtendLast(PrismConfig):
    """The plan of the prompt's `prompt` tokens, the tokens after it added to the last
    partition: a no-cache forward of prompt + generated tokens then computes what the
    last device computes while decoding."""
    prompt: int = 0

    def plan(self, n_tokens, causal, num_partitions=None, roles=None, static=False):
        sizes = _sizes(self.prompt, self.num_partitions)
        sizes[-1] += n_tokens - self.prompt
        anchors, grid = resolve(n_tokens, roles, self.anchors, self.segments)
        return make_plan(n_tokens, sizes=sizes, num_means=self.num_means, compression_rate=self.compression_rate,
                         causal=causal, anchors=anchors, grid=grid, anchor_budget=self.anchor_budget)


# data-dependent segments (chosen per layer from each partition's keys): at CR 2 a 7-token
# partition sends 4 rows, token 0 and the top-1 key alone and 2 content runs
DYN = dict(anchors="special+topk", anchor_topk=1, anchor_score="key_dev", segments="content_sse")


@pytest.mark.parametrize("model_type,P,averaging,CR,policy", [
    ("llama", 2, "attention_input", 4, {}), ("llama", 3, "attention_input", 4, {}),
    ("gpt2", 3, "attention_input", 4, {}), ("llama", 3, "block_input", 4, {}),
    ("qwen2", 3, "attention_input", 4, {}), ("llama", 3, "attention_input", 2, DYN),
    ("gpt2", 2, "attention_input", 2, dict(segments="kmeans"))])
def test_prism_decode_equals_forward_with_extended_last_partition(model_type, P, averaging, CR, policy):
    model = build_model(model_type)
    ids = _ids()
    phf.enable_prism(model, num_partitions=P, compression_rate=CR, averaging=averaging, **policy)
    tok, logits, out = _generate(model, ids)
    new = logits.shape[1]                     # NEW, or fewer after an end-of-sequence token
    stock_tok = None
    # step 0: the first token's logits are the plain Prism forward's (no cache) at the last position
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], plain, atol=1e-5, rtol=1e-5)
    # every step: a forward with the generated tokens on the last device
    phf.enable_prism(model, config=_ExtendLast(num_partitions=P, compression_rate=CR, averaging=averaging, prompt=N,
                                               **policy))
    seq = torch.cat([ids, tok], 1)
    with torch.no_grad():
        for k in range(1, new):
            ref = model(seq[:, :N + k], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits[:, k], ref, atol=1e-4, rtol=1e-4)
    # the cache: own rows + m_j = ceil(n_j / CR) means of every earlier partition (Eq. 16), + fed tokens
    sizes = _sizes(N, P)
    expected = sizes[-1] + sum(min(n, max(1, math.ceil(n / CR))) for n in sizes[:-1]) + new - 1
    rep = phf.cache_rows(out.cache)
    assert rep.rows == [[expected]] * model.config.num_hidden_layers
    assert rep.stock_rows == [N + new - 1]
    assert rep.bytes * (N + new - 1) == rep.stock_bytes * expected
    # and compression did change the generation (the check above is not vacuous)
    phf.disable_prism(model)
    stock_logits = _generate(model, ids)[1]
    assert not torch.allclose(stock_logits[:, 0], logits[:, 0], atol=1e-3)
    if policy:
        # the cache holds each layer's own counts, not the static plan's
        layers = [l for l in out.cache.layers if isinstance(l, generation.PrismCacheLayer)]
        static = PrismConfig(num_partitions=P, compression_rate=CR, anchors="special").plan(N, True)
        plan_counts = python_ref.device_tensors(static, P - 1)[0][:expected - new + 1]
        held = [l.counts[0, :expected - new + 1] for l in layers]
        assert all(int(c.sum()) == N for c in held)
        assert any(not torch.equal(c, plan_counts) for c in held)
        if policy is DYN:       # (seen: the k-means groups of this tiny GPT-2 are alike in its 2 layers)
            assert any(not torch.equal(held[0], c) for c in held[1:])


def test_decode_step_against_python_ref():
    """Layer 0 of Llama at P = 3, CR = 4, plain means: the cache rebuilt from the stock
    model's layer-0 keys (rotated) and python_ref's segment means, and one decode step
    computed by python_ref.prism_attention with the counts."""
    P, CR = 3, 4
    model = build_model("llama")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids, use_cache=True).cache.layers[0]     # layer 0: input = embeddings, same as Prism's
    phf.enable_prism(model, num_partitions=P, compression_rate=CR, anchors="none", segments="runs")
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.cache
    assert isinstance(cache, phf.PrismCache)
    layer = cache.layers[0]
    plan = python_ref.plan_layout(N, P, compression_rate=CR, causal=True)
    counts, q_pos, k_pos = python_ref.device_tensors(plan, P - 1)
    k_ref = python_ref.device_keys_values(stock.keys, plan, P - 1)
    v_ref = python_ref.device_keys_values(stock.values, plan, P - 1)
    torch.testing.assert_close(layer.keys, k_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.values, v_ref, atol=1e-6, rtol=1e-6)
    assert layer.counts[0].tolist() == counts.tolist() and layer.positions[0].tolist() == k_pos.tolist()

    seen = []
    real = generation.decode_step

    def spy(layer_, query, key, value, *a):
        res = real(layer_, query, key, value, *a)
        seen.append((layer_, query, key, value, res))
        return res

    nxt = out.logits[:, -1:].argmax(-1)
    generation.decode_step = spy
    try:
        with torch.no_grad():
            model(nxt, cache=cache, use_cache=True)
    finally:
        generation.decode_step = real
    lay0, q, k, v, res = seen[0]
    assert lay0 is layer and k.shape[2] == k_ref.shape[2] + 1
    kk = torch.cat([k_ref, k[:, :, -1:]], 2)              # the new token's key, count 1, at position N
    vv = torch.cat([v_ref, v[:, :, -1:]], 2)
    want = python_ref.prism_attention(q, kk, vv, key_counts=torch.cat([counts, torch.ones(1, dtype=torch.int64)]),
                                      causal=True, q_pos=torch.tensor([N]), k_pos=torch.cat([k_pos, torch.tensor([N])]),
                                      scale=model.model.layers[0].self_attn.scaling)
    torch.testing.assert_close(res, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("decode", ["prism", "exact"])
def test_left_padded_batch_equals_each_prompt_alone(model_type, decode):
    model = build_model(model_type)
    phf.enable_prism(model, num_partitions=3, compression_rate=4, decode=decode)
    lengths = [N, 14, 9]
    prompts = [_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(prompts), N, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, N - p.shape[1]:] = p[0]
        mask[i, N - p.shape[1]:] = 1
    tok, logits, out = _generate(model, ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        t1, l1, _ = _generate(model, p)
        assert torch.equal(tok[i], t1[0]), i
        torch.testing.assert_close(logits[i], l1[0], atol=1e-4, rtol=1e-4)
    rows = phf.cache_rows(out.cache).rows[0]
    if decode == "prism":      # each sequence's cache is its own plan's: n_P + sum m_j + fed tokens
        for i, n in enumerate(lengths):
            s = _sizes(n, 3)
            assert rows[i] == s[-1] + sum(math.ceil(x / 4) for x in s[:-1]) + NEW - 1
    else:
        assert rows == [n + NEW - 1 for n in lengths]


def test_sampling_and_several_sequences_per_prompt():
    """do_sample with num_return_sequences (the cache is repeated per sequence): at CR = 1
    the same seed draws the stock model's tokens."""
    model = build_model("llama")
    ids = _ids(batch=2)
    kw = dict(do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(5)
    ref = _generate(model, ids, **kw)[0]
    phf.enable_prism(model, num_partitions=2, compression_rate=1)
    torch.manual_seed(5)
    tok, _, out = _generate(model, ids, **kw)
    assert torch.equal(tok, ref)
    assert len(phf.cache_rows(out.cache).stock_rows) == 4
    phf.enable_prism(model, num_partitions=2, compression_rate=4)
    torch.manual_seed(5)
    assert _generate(model, ids, **kw)[0].shape == ref.shape


def test_beam_search_at_cr1_reproduces_stock():
    """Beam search reorders the cache (PrismCacheLayer.reorder_cache)."""
    model = build_model("llama")
    ids = _ids(batch=2)
    ref = model.generate(ids, max_new_tokens=NEW, num_beams=3, do_sample=False, pad_token_id=0)
    phf.enable_prism(model, num_partitions=3, compression_rate=1)
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, num_beams=3, do_sample=False, pad_token_id=0), ref)


def test_disable_restores_stock_generation_and_bad_decode_refused():
    model = build_model("gpt2")
    ids = _ids()
    ref_tok, ref_logits, ref_out = _generate(model, ids)
    phf.enable_prism(model, num_partitions=3, compression_rate=4)
    _generate(model, ids)
    phf.disable_prism(model)
    tok, logits, out = _generate(model, ids)
    assert torch.equal(tok, ref_tok) and torch.equal(logits, ref_logits)
    assert type(out.cache) is type(ref_out.cache)
    assert not any(hasattr(m, "_prism_generation") for m in model.modules())
    with pytest.raises(ValueError, match="decode"):
        phf.enable_prism(model, num_partitions=2, compression_rate=4, decode="fast")
    assert model.config._attn_implementation != "prism"
    with pytest.raises(ValueError, match="decode"):
        phf.PrismCache("fast")


def test_plain_forward_unchanged_and_refusals():
    """A forward without use_cache keeps its stock DynamicCache; a cache that the prism
    attention never filled, and cropping, are refused with clear errors."""
    model = build_model("llama")
    phf.enable_prism(model, num_partitions=2, compression_rate=4)
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        assert not isinstance(out.cache, phf.PrismCache)
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model(ids[:, :1], cache=out.cache)
    cache = phf.PrismCache()
    with torch.no_grad():
        model.model(ids, cache=cache, use_cache=True)        # not the hooked top-level model: rows never set
        with pytest.raises(RuntimeError, match="never set"):
            model.model(ids[:, :1], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="PrismCache"):
        phf.cache_rows(out.cache)


def test_cache_passed_by_the_caller_chooses_the_mode():
    model = build_model("llama")
    ids = _ids()
    phf.enable_prism(model, num_partitions=3, compression_rate=4, decode="exact")
    want = _generate(model, ids)
    phf.enable_prism(model, num_partitions=3, compression_rate=4)            # decode="prism"
    prism = _generate(model, ids)
    got = _generate(model, ids, cache=phf.PrismCache("exact"))
    assert got[2].cache.decode == "exact"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(prism[1], want[1])


def test_unsupported_generation_setups_raise():
    # a bias other than the log-count one has no prism decode cache: refused before the
    # prefill, with the keyword to change; decode="exact" serves it
    model = build_model("llama")
    for bias in ("spread", "matched", "matched_cls"):
        phf.enable_prism(model, num_partitions=2, compression_rate=4, count_bias=bias)
        with pytest.raises(NotImplementedError, match=f"count_bias='log'.*count_bias='{bias}'"):
            _generate(model, _ids())
        with pytest.raises(NotImplementedError, match="decode='exact'"):
            _generate(model, _ids(), cache=phf.PrismCache("prism"))
    phf.enable_prism(model, num_partitions=2, compression_rate=4, count_bias="matched", decode="exact")
    assert _generate(model, _ids())[0].shape[1] == NEW
    # attn_implementation="prism" without enable_prism: no hook, the first decode step says what to do
    cfg = build_model("llama").config
    cfg.prism = PrismConfig(num_partitions=2, compression_rate=4).to_dict()
    model = build_model("llama", config=cfg)
    model.config._attn_implementation_internal = "prism"
    for c in (m.config for m in model.modules() if hasattr(m, "config")):
        c._attn_implementation_internal = "prism"
    with pytest.raises(NotImplementedError, match="enable_prism"):
        _generate(model, _ids())

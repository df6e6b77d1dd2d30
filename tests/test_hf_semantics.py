"""Semantics of the simulated Prism attention inside HF models.

* padding: a padded batch gives each sequence what it gets alone (pads are not
  tokens: not partitioned, not averaged, never keys), also under compression;
  pad token ids do not matter; the mask entry is registered;
* one layer checked against an independent construction from python_ref
  (device_keys_values + duplicated_attention), for both averagings, causal
  (GPT-2) and not (ViT), also with uneven partitions (partition_weights);
* block-input averaging: exact at CR=1 for every pre-LN family, equals the
  default on post-LN BERT, differs from it on pre-LN models;
* one prism_attention call per layer (devices and heads batched);
* attn_implementation="prism" at construction; clear errors.
"""
import pytest
import torch
from transformers import (BertConfig, BertModel, Dinov2Config, Dinov2Model, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import prism_kernels.hf as phf
import prism_kernels.hf.attention as hfatt
from prism_kernels.hf import PrismConfig
from python_ref import (device_keys_values, device_tensors, duplicated_attention, local_rows, plan_from_segments,
                        plan_layout)

# the paper's segments (no anchors, contiguous runs): what plan_layout describes
PLAIN = dict(anchors="none", segments="runs")

H = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
         initializer_range=0.2)
VOCAB = 100


def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **H)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      initializer_range=0.2, bos_token_id=0, eos_token_id=0)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=2,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0, **H)).eval()


def vit():
    torch.manual_seed(0)
    return ViTModel(ViTConfig(image_size=32, patch_size=8, **H)).eval()


def dinov2():
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, mlp_ratio=2, initializer_range=0.2)).eval()


def _out(model, **inputs):
    o = model(**inputs)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _ids(B=3, N=19, seed=1):
    return torch.randint(1, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("make,left", [(bert, False), (gpt2, True), (gpt2, False), (llama, True)])
@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_padded_batch_equals_each_sequence_alone(make, left, averaging):
    """Under compression (P=3, CR=3) a padded sequence's real-token outputs equal its unpadded run."""
    model = make()
    lengths = [19, 11, 4]
    ids = _ids()
    am = torch.zeros_like(ids)
    for b, L in enumerate(lengths):
        if left:
            am[b, 19 - L:] = 1
        else:
            am[b, :L] = 1
    phf.enable_prism(model, num_partitions=3, compression_rate=3.0, averaging=averaging)
    with torch.no_grad():
        # positions count real tokens only (GPT-2's absolute positions would otherwise shift)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        batched = _out(model, input_ids=ids, attention_mask=am, position_ids=pos)
        for b, L in enumerate(lengths):
            real = am[b].bool()
            alone = _out(model, input_ids=ids[b:b + 1, real])[0]
            assert torch.allclose(batched[b, real], alone, atol=2e-5 * alone.abs().max(), rtol=0), (b, L)
            # and the padded rows of the output are not NaN
        assert torch.isfinite(batched).all()


def test_pad_token_ids_do_not_matter_and_mask_is_registered():
    """Changing what sits in padded slots changes nothing; 'prism' is in AttentionMaskInterface."""
    assert "prism" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    model = bert()
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    phf.enable_prism(model, num_partitions=2, compression_rate=4.0)
    other = ids.clone()
    other[1, 9:] = torch.randint(1, VOCAB, (10,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = _out(model, input_ids=ids, attention_mask=am)
        b = _out(model, input_ids=other, attention_mask=am)
        c = _out(model, input_ids=other)        # no mask: the pads are real tokens now
    assert torch.allclose(a[1, :9], b[1, :9], atol=1e-6)
    assert not torch.allclose(a[1, :9], c[1, :9], atol=1e-3)


@pytest.mark.parametrize("make", [bert, llama])
@pytest.mark.parametrize("policy", [dict(anchors="special+topk", anchor_topk=2), dict(segments="content"),
                                    dict(anchors="special+topk", anchor_score="key_dev", segments="content_sse")])
def test_padded_batch_with_data_dependent_segments(make, policy):
    """The data-dependent policies (prism_kernels/dynamic.py) keep the padding rule: each sequence
    gets what it gets alone (its segments come from its own keys)."""
    model = make()
    ids = _ids()
    am = torch.zeros_like(ids)
    for b, L in enumerate([19, 11, 4]):
        am[b, :L] = 1
    phf.enable_prism(model, num_partitions=3, compression_rate=3.0, **policy)
    with torch.no_grad():
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        batched = _out(model, input_ids=ids, attention_mask=am, position_ids=pos)
        for b in range(3):
            real = am[b].bool()
            alone = _out(model, input_ids=ids[b:b + 1, real])[0]
            assert torch.allclose(batched[b, real], alone, atol=2e-5 * alone.abs().max(), rtol=0), b


def test_mask_function_output():
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    m = phf.prism_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=am)
    assert m.shape == (2, 1, 1, 4) and m.dtype == torch.bool and m[0, 0, 0].tolist() == [1, 1, 1, 0]
    assert phf.prism_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 4)) is None


def test_sequence_shorter_than_partitions():
    """A sequence with fewer real tokens than P runs on that many devices; CR=1 stays exact."""
    model = bert()
    ids = _ids(2, 8)
    am = torch.ones_like(ids)
    am[1, 2:] = 0
    with torch.no_grad():
        ref = _out(model, input_ids=ids, attention_mask=am)
        phf.enable_prism(model, num_partitions=4, compression_rate=1.0)
        out = _out(model, input_ids=ids, attention_mask=am)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1, :2], ref[1, :2], atol=1e-5)


# ---------------------------------------------------------------- independent one-layer reference

def _reference_layer(x, norm, q_of, kv_of, out_proj, plan, averaging, scale, heads, head_dim):
    """Attention output of every device from python_ref (docs/method.md, "Scaling-aware attention", Eq. 11)."""
    B, N, _ = x.shape
    rows = []
    for i in range(len(plan.sizes)):
        if averaging == "attention_input":
            xt = device_keys_values(norm(x), plan, i)       # means of LN(X): K of them = mean of K
        else:
            xt = norm(device_keys_values(x, plan, i))       # LN(means of X): the paper's variant
        q = q_of(norm(local_rows(x, plan, i)))
        k, v = kv_of(xt)
        split = lambda t: t.view(B, t.shape[1], heads, head_dim).transpose(1, 2)
        counts, qp, kp = device_tensors(plan, i)
        o = duplicated_attention(split(q), split(k), split(v), counts, causal=plan.causal,
                                 q_pos=qp if plan.causal else None, k_pos=kp if plan.causal else None,
                                 scale=scale)
        rows.append(out_proj(o.transpose(1, 2).reshape(B, -1, heads * head_dim)))
    return torch.cat(rows, 1)


def _capture(module):
    store = {}
    h = module.register_forward_hook(lambda m, a, o: store.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    return store, h


def _gpt2_layer_vs_python_ref(averaging, plan, **settings):
    """GPT-2 layer 0 under enable_prism(**settings) against python_ref on `plan` (17 tokens)."""
    model = gpt2()
    ids = _ids(2, 17)
    blk = model.transformer.h[0]
    D = 64
    phf.enable_prism(model, averaging=averaging, **settings)
    store, h = _capture(blk.attn)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
        ref = _reference_layer(hs, blk.ln_1, lambda a: blk.attn.c_attn(a)[..., :D],
                               lambda a: blk.attn.c_attn(a)[..., D:].split(D, -1), blk.attn.c_proj,
                               plan, averaging, blk.attn.scaling, 4, 16)
    h.remove()
    assert torch.allclose(store["out"], ref, atol=1e-5 * ref.abs().max())


def _vit_layer_vs_python_ref(averaging, plan, **settings):
    """ViT layer 0 (17 tokens: [CLS] + 4 x 4 patches) under enable_prism(**settings) against python_ref."""
    model = vit()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    lay = model.layers[0]
    att = lay.attention
    phf.enable_prism(model, averaging=averaging, **settings)
    store, h = _capture(att)
    with torch.no_grad():
        hs = model(pixel_values=px, output_hidden_states=True).hidden_states[0]
        ref = _reference_layer(hs, lay.layernorm_before, att.q_proj, lambda a: (att.k_proj(a), att.v_proj(a)),
                               att.o_proj, plan, averaging, att.scaling, 4, 16)
    h.remove()
    assert torch.allclose(store["out"], ref, atol=1e-5 * ref.abs().max())


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_gpt2_layer_against_python_ref(averaging):
    _gpt2_layer_vs_python_ref(averaging, plan_layout(17, 3, compression_rate=2.5, causal=True),
                              num_partitions=3, compression_rate=2.5, **PLAIN)


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_vit_layer_against_python_ref(averaging):
    _vit_layer_vs_python_ref(averaging, plan_layout(17, 2, 3), num_partitions=2, num_means=3, **PLAIN)


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_gpt2_anchored_layer_against_python_ref(averaging):
    """The special-token policy on a decoder: token 0 is sent alone, out of partition 0's
    budget. 17 tokens, P = 3 (6 + 6 + 5), CR 2.5: m = 3, 3, 2; the segments are
    written out by hand and python_ref computes the layer from them."""
    segs = [[[0], [1, 2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]], [[12, 13, 14], [15, 16]]]
    _gpt2_layer_vs_python_ref(averaging, plan_from_segments(17, [6, 6, 5], segs, causal=True),
                              num_partitions=3, compression_rate=2.5, anchors="special")


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_vit_anchor_and_2d_blocks_against_python_ref(averaging):
    """The special-token policy on a ViT: [CLS] alone and 2 x 2 blocks of the 4 x 4 patch
    grid (tokens 1..16, row-major). P = 2 (9 + 8 tokens), 2 means each plus the
    anchor on top (anchor_budget="extra"); segments written out by hand."""
    segs = [[[0], [1, 2, 5, 6], [3, 4, 7, 8]], [[9, 10, 13, 14], [11, 12, 15, 16]]]
    _vit_layer_vs_python_ref(averaging, plan_from_segments(17, [9, 8], segs), num_partitions=2, num_means=2,
                             anchors="special", anchor_budget="extra")


def _ref_plan(sizes, cr, causal):
    """python_ref's plan for given partition sizes, built here (not by prism_kernels.plan)."""
    from python_ref.layout import DeviceLayout, PrismPlan
    from python_ref.partition import num_means, partition_offsets, segment_sizes
    offs, ms = partition_offsets(sizes), [num_means(n, cr) for n in sizes]
    devs = []
    for i, (o, n) in enumerate(zip(offs, sizes)):
        src = tuple(j for j in range(len(sizes)) if j != i and (not causal or j < i))
        counts, kpos = [1] * n, list(range(o, o + n))
        for j in src:
            seg = segment_sizes(sizes[j], ms[j])
            counts += seg
            kpos += (torch.tensor(seg).cumsum(0) + offs[j] - 1).tolist()
        devs.append(DeviceLayout(i, o, n, src, tuple(counts), tuple(kpos)))
    return PrismPlan(sum(sizes), tuple(sizes), tuple(offs), tuple(ms), causal, tuple(devs))


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_uneven_partitions_against_python_ref(averaging):
    """partition_weights (2, 1): 17 tokens split 11 + 6; the layer equals python_ref on that split."""
    _gpt2_layer_vs_python_ref(averaging, _ref_plan([11, 6], 2.5, True), num_partitions=2, compression_rate=2.5,
                              partition_weights=(2, 1), **PLAIN)


@pytest.mark.parametrize("make", [bert, gpt2])
def test_uneven_partitions_exact_at_cr1(make):
    model = make()
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 11:] = 0
    am[2, 2:] = 0
    with torch.no_grad():
        ref = _out(model, input_ids=ids, attention_mask=am)
        phf.enable_prism(model, config=PrismConfig(num_partitions=2, compression_rate=1.0,
                                                   partition_weights=(2, 1)))
        out = _out(model, input_ids=ids, attention_mask=am)
        phf.enable_prism(model, num_partitions=2, compression_rate=4.0, partition_weights=(2, 1))
        comp = _out(model, input_ids=ids, attention_mask=am)
    real = am.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5 * ref.abs().max())
    assert not torch.allclose(comp[real], ref[real], atol=1e-3)


def test_layout_follows_the_padding_of_each_forward():
    """The per-forward index layout is reused across layers, never across different paddings."""
    model = bert()
    ids = _ids()
    phf.enable_prism(model, num_partitions=2, compression_rate=4.0)
    with torch.inference_mode():
        for cut in (9, 5, 9, 19):
            am = torch.ones_like(ids)
            am[1, cut:] = 0
            got = _out(model, input_ids=ids, attention_mask=am)[1, :cut]
            alone = _out(model, input_ids=ids[1:2, :cut])[0]
            assert torch.allclose(got, alone, atol=2e-5 * alone.abs().max(), rtol=0), cut


def test_no_python_ref_in_the_package_parts():
    """The simulation, `prism demo` and `prism eval` read the plan, not the test oracle."""
    from pathlib import Path
    root = Path(phf.__file__).resolve().parent.parent
    files = [*(root / "hf").glob("*.py"), root / "commands" / "demo.py", *(root / "eval").glob("*.py")]
    assert files and not [f.name for f in files if "python_ref" in f.read_text()]


# ---------------------------------------------------------------- block-input averaging

@pytest.mark.parametrize("make", [vit, dinov2, gpt2, llama])
def test_block_input_exact_at_cr1_and_differs_when_compressed(make):
    model = make()
    inputs = (dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
              if make in (vit, dinov2) else dict(input_ids=_ids()))
    with torch.no_grad():
        ref = _out(model, **inputs)
        phf.enable_prism(model, num_partitions=3, compression_rate=1.0, averaging="block_input")
        assert torch.allclose(_out(model, **inputs), ref, atol=1e-5 * ref.abs().max())
        phf.enable_prism(model, num_partitions=3, compression_rate=4.0, averaging="block_input")
        blk = _out(model, **inputs)
        phf.enable_prism(model, num_partitions=3, compression_rate=4.0)
        att = _out(model, **inputs)
        phf.disable_prism(model)
        assert torch.equal(_out(model, **inputs), ref)          # hooks removed
    scale = ref.abs().max()
    assert (blk - att).abs().max() > 1e-3 * scale               # pre-LN: the two averagings differ
    assert (blk - ref).abs().max() > 1e-3 * scale


def test_block_input_equals_attention_input_on_post_ln_bert():
    model = bert()
    ids = _ids()
    with torch.no_grad():
        # (block_input's "auto" anchors are the special tokens: the same policy on both sides)
        phf.enable_prism(model, num_partitions=3, compression_rate=4.0, averaging="block_input")
        a = _out(model, input_ids=ids)
        phf.enable_prism(model, num_partitions=3, compression_rate=4.0, anchors="special")
        b = _out(model, input_ids=ids)
        ref = _out(phf.disable_prism(model), input_ids=ids)
    assert torch.allclose(a, b, atol=1e-5 * b.abs().max())
    assert not torch.allclose(b, ref, atol=1e-3)


# ---------------------------------------------------------------- batching, construction, errors

def test_one_batched_attention_call_per_layer(monkeypatch):
    """All devices of all sequences (padded batch, 3 lengths) share one prism_attention call per layer."""
    calls = []
    real = hfatt.prism_attention

    def counting(q, *a, **kw):
        calls.append(tuple(q.shape))
        return real(q, *a, **kw)

    monkeypatch.setattr(hfatt, "prism_attention", counting)
    model = gpt2()
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 12:] = 0
    am[2, 5:] = 0
    phf.enable_prism(model, num_partitions=3, compression_rate=2.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    assert len(calls) == 2                                        # 2 layers
    assert calls[0][0] == 3 * 3 and calls[0][1] == 4              # 3 sequences x 3 devices, all heads


def test_attn_implementation_prism_at_construction():
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **H)
    torch.manual_seed(0)
    stock = BertModel(cfg).eval()
    cfg2 = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **H)
    cfg2.prism = PrismConfig(num_partitions=2, compression_rate=4.0).to_dict()
    torch.manual_seed(0)
    built = BertModel._from_config(cfg2, attn_implementation="prism").eval()
    ids = _ids()
    with torch.no_grad():
        a = _out(built, input_ids=ids)
        b = _out(phf.enable_prism(stock, num_partitions=2, compression_rate=4.0), input_ids=ids)
    assert built.config._attn_implementation == "prism"
    assert torch.allclose(a, b, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="exactly one"):
        PrismConfig(num_partitions=2)
    with pytest.raises(ValueError, match="compression_rate"):
        PrismConfig(num_partitions=2, compression_rate=0.5)
    with pytest.raises(ValueError, match="averaging"):
        PrismConfig(num_partitions=2, num_means=2, averaging="output")
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **H)
    with pytest.raises(ValueError, match="enable_prism"):
        BertModel._from_config(cfg, attn_implementation="prism")(input_ids=_ids())
    # (decoding from a cache is supported: tests/test_hf_generate.py)


# ---------------------------------------------------------------- gradients (fine-tuning with Prism in the loop)

@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_gradients_flow_through_the_means(averaging):
    """At CR=1 (P=3) every parameter gradient equals the stock model's; means must not cut the graph."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = _ids(2, 15)
    am = torch.ones_like(ids)
    am[1, 11:] = 0

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ref = grads()
    phf.enable_prism(model, num_partitions=3, compression_rate=1.0, averaging=averaging)
    got = grads()
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max(), rtol=0)

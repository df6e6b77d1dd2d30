"""count_bias="matched" / "matched_half" / "matched_shared" / "matched_cls": each segment
sent as its attention-weighted key and value with a bias, matched at the sending
partition's mean query (or at the first token's, matched_cls). Checked against plain
softmax over every token (fp64)."""

import pytest
import torch

from prism_kernels import dynamic as dyn
from prism_kernels.config import PrismConfig
from prism_kernels.distributed.runtime import RunConfig
from prism_kernels.hf.attention import simulate_prism
from prism_kernels.hf.matched_summary import MATCHED, augment_bias, matched_summary

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _segments(Bg, n, m, gen):
    seg_of = torch.stack([torch.randperm(n, generator=gen) % m for _ in range(Bg)])
    counts = torch.zeros(Bg, m, dtype=torch.int64).scatter_add_(1, seg_of, torch.ones_like(seg_of))
    return seg_of, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("m", [1, 5])
def test_rows_reproduce_every_token_at_the_matched_query(dtype, heads, kv_heads, m):
    """A receiver whose query is the one matched at sees, through the summary rows (one
    extra score dimension carrying the bias, counts 1), exactly the output it would
    get from all of the sender's tokens, for any gamma."""
    gen = torch.Generator().manual_seed(0)
    Bg, n, d, s = 2, 23, 8, 8 ** -0.5
    q = torch.randn(Bg, n, heads * d, generator=gen, dtype=dtype) + 1.5   # queries off-centre
    k = torch.randn(Bg, n, kv_heads * d, generator=gen, dtype=dtype)
    v = torch.randn(Bg, n, kv_heads * d, generator=gen, dtype=dtype)
    seg_of, counts = _segments(Bg, n, m, gen)
    for gamma in (1.0, 0.5, 2.0):
        km, vm, b = matched_summary(q, k, v, seg_of, counts, heads, s, gamma)
        assert km.dtype == dtype and b.shape == (Bg, m, kv_heads)
        g = heads // kv_heads
        q0 = q.double().view(Bg, n, heads, d).mean(1).view(Bg, kv_heads, g, d).mean(2) * gamma   # [Bg, Hkv, d]
        # the oracle: softmax of the matched query over all n tokens, per KV head
        kd, vd = k.double().view(Bg, n, kv_heads, d), v.double().view(Bg, n, kv_heads, d)
        p = torch.softmax(s * torch.einsum("bnhd,bhd->bhn", kd, q0), -1)
        want = torch.einsum("bhn,bnhd->bhd", p, vd)
        # through the rows: scores s q0.k~ + b, counts 1
        q4 = q0[:, :, None, :]                                     # [Bg, Hkv, 1, d]
        k4 = km.double().view(Bg, m, kv_heads, d).transpose(1, 2)
        v4 = vm.double().view(Bg, m, kv_heads, d).transpose(1, 2)
        q2, k2, v2 = augment_bias(q4, k4, v4, b.double().transpose(1, 2) / s)
        got = torch.softmax(s * q2 @ k2.transpose(-1, -2), -1) @ v2
        assert torch.allclose(got[:, :, 0, :d], want, atol=TOL[dtype] * 10, rtol=0)
        assert torch.all(got[..., d] == 0)
        # each row's bias on its own (a softmax over one row would not see it): the
        # segment's log-sum-exp at q0 minus s q0.k~, computed here token by token
        z = s * torch.einsum("bnhd,bhd->bnh", kd, q0)                      # [Bg, n, Hkv]
        for j in range(m):
            member = (seg_of == j)[..., None]                               # [Bg, n, 1]
            lse = torch.logsumexp(z.masked_fill(~member, float("-inf")), dim=1)   # [Bg, Hkv]
            kt = km.double().view(Bg, m, kv_heads, d)[:, j]                 # [Bg, Hkv, d]
            want_b = lse - s * (kt * q0).sum(-1)
            assert torch.allclose(b[:, j].double(), want_b, atol=TOL[dtype] * 10, rtol=0)


def test_gamma_zero_is_the_paper_row():
    """Matched at q = 0 the rows are the plain means and the bias is log c."""
    gen = torch.Generator().manual_seed(1)
    Bg, n, m, H, d = 3, 17, 4, 2, 8
    q, k, v = (torch.randn(Bg, n, H * d, generator=gen) for _ in range(3))
    seg_of, counts = _segments(Bg, n, m, gen)
    km, vm, b = matched_summary(q, k, v, seg_of, counts, H, d ** -0.5, 0.0)
    assert torch.allclose(km, dyn.means(k, seg_of, counts), atol=1e-6)
    assert torch.allclose(vm, dyn.means(v, seg_of, counts), atol=1e-6)
    assert torch.allclose(b, counts.double().log()[..., None].expand(Bg, m, H).float(), atol=1e-6)


def test_a_token_alone_keeps_its_row_and_no_bias():
    gen = torch.Generator().manual_seed(2)
    n, H, d = 6, 2, 4
    q, k, v = (torch.randn(1, n, H * d, generator=gen) for _ in range(3))
    seg_of = torch.arange(n)[None]
    km, vm, b = matched_summary(q, k, v, seg_of, torch.ones(1, n, dtype=torch.int64), H, 0.5, 1.0)
    assert torch.allclose(km, k) and torch.allclose(vm, v) and torch.allclose(b, torch.zeros_like(b), atol=1e-6)


def test_shared_weights_are_one_per_token():
    """matched_shared: every KV head pools its keys / values with the same token weights
    (the mean over heads of the per-head weights), so the rows are one weighted average
    of the attention input's projections; with a single KV head it equals matched."""
    gen = torch.Generator().manual_seed(5)
    Bg, n, m, H, d, s = 2, 15, 3, 4, 8, 8 ** -0.5
    q = torch.randn(Bg, n, H * d, generator=gen, dtype=torch.float64) + 1.0
    k, v = (torch.randn(Bg, n, H * d, generator=gen, dtype=torch.float64) for _ in range(2))
    seg_of, counts = _segments(Bg, n, m, gen)
    km, vm, b = matched_summary(q, k, v, seg_of, counts, H, s, 1.0, shared=True)
    q0 = q.view(Bg, n, H, d).mean(1)                                       # [Bg, H, d]
    z = s * torch.einsum("bnhd,bhd->bnh", k.view(Bg, n, H, d), q0)
    w = torch.zeros(Bg, n, H, dtype=torch.float64)
    for j in range(m):
        sel = seg_of == j                                                  # [Bg, n]
        zz = z.masked_fill(~sel[..., None], float("-inf"))
        w += torch.softmax(zz, dim=1).nan_to_num(0.0)
    w = w.mean(-1)                                                         # [Bg, n]: one weight per token
    for j in range(m):
        wj = w * (seg_of == j)
        assert torch.allclose(km[:, j], (wj[..., None] * k).sum(1), atol=1e-12)
        assert torch.allclose(vm[:, j], (wj[..., None] * v).sum(1), atol=1e-12)
    one = matched_summary(q, k[..., :d], v[..., :d], seg_of, counts, H, s, 1.0, shared=True)
    ref = matched_summary(q, k[..., :d], v[..., :d], seg_of, counts, H, s, 1.0)
    assert all(torch.allclose(a, c) for a, c in zip(one, ref))


@pytest.mark.parametrize("bias", ["matched", "matched_half", "matched_shared", "matched_cls"])
def test_simulation_with_every_token_alone_is_exact(bias):
    """CR = 1: every row is one token, so the matched rows change nothing."""
    gen = torch.Generator().manual_seed(3)
    B, H, N, d = 2, 4, 20, 8
    q, k, v = (torch.randn(B, H, N, d, generator=gen) for _ in range(3))
    cfg = PrismConfig(3, compression_rate=1.0, count_bias=bias, anchors="special+topk")
    out = simulate_prism(q, k, v, config=cfg, causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("P", [2, 3])
def test_matched_cls_is_exact_for_a_query_equal_to_the_first_tokens(P):
    """count_bias="matched_cls" matches every partition's rows at the first token's query:
    a token of the last partition whose query equals it (one KV head per head) gets
    exactly the full attention's output through the received rows, at CR 4; with rows
    matched at the mean query it does not. The oracle is plain softmax over all tokens."""
    gen = torch.Generator().manual_seed(5)
    B, H, N, d = 2, 4, 36, 8
    q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) + 0.5
    k, v = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(2))
    t = N - 3                                  # in the last partition
    q[:, :, t] = q[:, :, 0]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)     # [B, N, H, d]
    outs = {}
    for bias in ("matched_cls", "matched"):
        cfg = PrismConfig(P, compression_rate=4, anchors="special+topk", anchor_topk=1, count_bias=bias)
        outs[bias] = simulate_prism(q, k, v, config=cfg, causal=False)
    assert torch.allclose(outs["matched_cls"][:, t], full[:, t], atol=1e-10, rtol=0)
    assert (outs["matched"][:, t] - full[:, t]).abs().max() > 1e-4
    # the other tokens of that partition are not exact (the rows are summaries)
    assert (outs["matched_cls"][:, t - 1] - full[:, t - 1]).abs().max() > 1e-4


def test_simulation_differs_from_plain_rows_and_stays_finite():
    """At CR 4 the matched rows change the output (the option is wired in) and the
    output stays finite; the exactness checks above say by how much it may differ."""
    gen = torch.Generator().manual_seed(4)
    B, H, N, d = 2, 4, 40, 8
    q = torch.randn(B, H, N, d, generator=gen) + 1.0
    k, v = (torch.randn(B, H, N, d, generator=gen) for _ in range(2))
    base = PrismConfig(2, compression_rate=4, anchors="special+topk", anchor_topk=1, count_bias="log")
    plain = simulate_prism(q, k, v, config=base, causal=False)
    matched = simulate_prism(q, k, v, config=PrismConfig(2, compression_rate=4, anchors="special+topk",
                                                         anchor_topk=1, count_bias="matched"), causal=False)
    assert torch.isfinite(matched).all()
    assert (matched - plain).abs().max() > 1e-3


def test_matched_needs_data_dependent_segments():
    with pytest.raises(ValueError, match="count_bias='matched' needs data-dependent segments"):
        PrismConfig(2, compression_rate=4, anchors="special", segments="runs", count_bias="matched")
    cfg = PrismConfig(2, compression_rate=4, count_bias="matched")
    assert cfg.dynamic                       # "auto" resolves to the data-dependent default
    # the runtime sends matched rows (tests/test_distributed.py checks them against this simulation)
    assert RunConfig(mode="prism", prism=cfg).prism.count_bias == "matched"


def test_the_runtime_knows_every_matched_bias():
    from prism_kernels.costs.comm import MATCHED_BIASES
    assert set(MATCHED) == set(MATCHED_BIASES)


def test_auto_count_bias_is_matched_for_encoders_only():
    """count_bias="auto" (the default): rows matched at the mean query for a bidirectional
    text model whose segments are chosen per layer, at the [CLS] query for a vision
    model; the log-count bias for decoders, static plans and CR = 1; an explicit choice
    is kept."""
    from prism_kernels.anchors import TEXT, TokenRoles
    grid = TokenRoles(leading=1, patch_grid=(4, 4))
    cfg = PrismConfig(2, compression_rate=4)
    assert cfg.count_bias == "auto" and cfg.dynamic
    assert cfg.bias_for(causal=False, roles=TEXT) == "matched"
    assert cfg.bias_for(causal=False) == "matched"                  # no roles: text
    assert cfg.bias_for(causal=False, roles=grid) == "matched_cls"  # a vision model: at the [CLS] query
    assert cfg.bias_for(causal=True, roles=TEXT) == "log"           # a decoder
    assert PrismConfig(2, compression_rate=4, anchors="special").bias_for(False, TEXT) == "log"   # static
    assert PrismConfig(2, compression_rate=1.0).bias_for(False, TEXT) == "log"                    # every token
    assert PrismConfig(2, compression_rate=4, count_bias="log").bias_for(False, TEXT) == "log"
    assert PrismConfig(2, compression_rate=4, count_bias="matched_half").bias_for(True, grid) == "matched_half"

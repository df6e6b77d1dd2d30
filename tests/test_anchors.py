"""Anchor tokens and segment shapes: the policies of prism_kernels.anchors, through
PrismConfig.plan, checked against plans written out by hand and against the rules
every plan must keep (each token in exactly one segment, anchors alone, blocks
compact)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_kernels.anchors import TokenRoles, resolve
from prism_kernels.config import PrismConfig
from prism_kernels.models import MODEL_TYPES, lookup

BERT = TokenRoles(leading=1, trailing=1)
VIT_4x4 = TokenRoles(leading=1, patch_grid=(4, 4))


def segments(plan):
    return [[list(s.tokens) for s in p.segments] for p in plan.partitions]


def test_bert_cls_and_sep_alone_out_of_the_budget():
    # 10 tokens, P = 2, m = 3: [CLS] and [SEP] take one of their partition's 3 rows each
    plan = PrismConfig(2, num_means=3, anchors="special").plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2], [3, 4]], [[5, 6], [7, 8], [9]]]
    assert plan.means == (3, 3)


def test_extra_budget_adds_the_anchors():
    plan = PrismConfig(2, num_means=2, anchors="special", anchor_budget="extra").plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2], [3, 4]], [[5, 6], [7, 8], [9]]]
    plan = PrismConfig(2, num_means=2, anchors="special").plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2, 3, 4]], [[5, 6, 7, 8], [9]]]


def test_policies_first_and_none():
    assert segments(PrismConfig(2, num_means=2, anchors="first").plan(10, False, roles=BERT)) == \
        [[[0], [1, 2, 3, 4]], [[5, 6, 7], [8, 9]]]
    assert segments(PrismConfig(2, num_means=2, anchors="none").plan(10, False, roles=BERT)) == \
        [[[0, 1, 2], [3, 4]], [[5, 6, 7], [8, 9]]]


def test_shared_budget_sends_exactly_m_rows():
    # [CLS] and [SEP] in one partition of m = 2: [CLS] alone, [SEP] averaged; m = 1: one plain mean
    assert segments(PrismConfig(1, num_means=2, anchors="special").plan(6, False, roles=BERT)) == [[[0], [1, 2, 3, 4, 5]]]
    assert segments(PrismConfig(1, num_means=1, anchors="special").plan(6, False, roles=BERT)) == [[[0, 1, 2, 3, 4, 5]]]
    assert segments(PrismConfig(1, num_means=1, anchors="special", anchor_budget="extra").plan(6, False, roles=BERT)) == \
        [[[0], [1, 2, 3, 4], [5]]]


def test_vit_blocks_of_the_patch_grid():
    # 4 x 4 patches (tokens 1..16, row-major) after [CLS]; P = 2: tokens 0..8 and 9..16
    plan = PrismConfig(2, num_means=3, anchors="special").plan(17, False, roles=VIT_4x4)
    assert segments(plan)[0] == [[0], [1, 2, 5, 6], [3, 4, 7, 8]]
    plan = PrismConfig(2, num_means=2, segments="runs", anchors="none").plan(17, False, roles=VIT_4x4)
    assert segments(plan) == [[[0, 1, 2, 3, 4], [5, 6, 7, 8]], [[9, 10, 11, 12], [13, 14, 15, 16]]]


def test_grid_follows_the_input_resolution():
    roles = TokenRoles(leading=1, patch_grid=(16, 16))      # configured for 224 px, run at 112 px
    assert roles.grid(1 + 8 * 8) == (8, 8, 1)
    assert roles.grid(1 + 16 * 16) == (16, 16, 1)
    assert roles.grid(1 + 6 * 7) is None                      # not a known grid: contiguous runs
    assert TokenRoles().grid(50) is None


def test_decoder_first_token_alone_and_causal_positions():
    plan = PrismConfig(3, compression_rate=2.5, anchors="special").plan(17, True, roles=lookup("llama").roles(None))
    assert segments(plan)[:2] == [[[0], [1, 2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]
    # a mean is visible from its segment's last token on (the partition-aware mask)
    assert plan.device(2).key_positions[5:] == (0, 3, 5, 7, 9, 11)
    assert plan.device(2).counts[5:] == (1, 3, 2, 2, 2, 2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_model_type_has_roles(model_type):
    entry = lookup(model_type)
    roles = entry.roles(entry.build_config("tiny"))
    assert roles.leading >= 1
    assert (roles.patch_grid is not None) == (entry.kind == "vision")
    assert roles.trailing == (1 if entry.kind == "encoder" else 0)


@pytest.mark.parametrize("field, value", [("anchors", "cls"), ("segments", "grid"), ("anchor_budget", "more")])
def test_bad_policy_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PrismConfig(2, compression_rate=4, **{field: value})


def test_bad_roles_are_refused():
    with pytest.raises(ValueError, match="leading"):
        TokenRoles(leading=-1)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 80), P=st.integers(1, 4), cr=st.floats(1.0, 40.0),
       anchors=st.sampled_from(["special", "first", "none"]), seg=st.sampled_from(["auto", "runs"]),
       budget=st.sampled_from(["shared", "extra"]), side=st.integers(1, 8), causal=st.booleans())
def test_plan_rules_hold_for_every_policy(n, P, cr, anchors, seg, budget, side, causal):
    roles = TokenRoles(leading=1, trailing=1, patch_grid=(side, side))
    P = min(P, n)
    cfg = PrismConfig(P, compression_rate=cr, anchors=anchors, segments=seg, anchor_budget=budget)
    plan = cfg.plan(n, causal, roles=roles)
    want_anchors, grid = resolve(n, roles, anchors, seg)
    for part in plan.partitions:
        toks = sorted(t for s in part.segments for t in s.tokens)
        assert toks == list(part.tokens)                            # every token exactly once
        own = [a for a in want_anchors if part.offset <= a < part.offset + part.size]
        m = min(part.size, max(1, math.ceil(part.size / cr)))      # Eq. 16, computed here
        if budget == "shared":
            own = own[:m - 1] if len(own) >= m else own
        for a in own:                                               # anchors alone
            assert (a,) in [s.tokens for s in part.segments]
        rest = part.size - len(own)
        if budget == "shared":
            assert part.num_segments == m                           # the budget holds
        else:
            assert part.num_segments == len(own) + min(rest, m)
        if grid is not None:                                        # 2-D blocks stay compact
            rows, cols, first = grid
            for s in part.segments:
                rc = [divmod(t - first, cols) for t in s.tokens if t >= first]
                if len(rc) > 1:
                    h = max(r for r, _ in rc) - min(r for r, _ in rc) + 1
                    w = max(c for _, c in rc) - min(c for _, c in rc) + 1
                    assert h * w <= 2 * len(rc) + max(h, w), (s.tokens, grid)
    for d in plan.devices:                                          # positions: the last token
        for j in d.sources:
            for s in plan.partitions[j].segments:
                assert s.position == max(s.tokens)


# ---------------------------------------------------------------- data-dependent segments (simulation only)

import torch  # noqa: E402

from prism_kernels import dynamic as dyn  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 40), mfrac=st.floats(0.0, 1.0), nfixed=st.integers(0, 2), topk=st.integers(0, 4),
       score=st.sampled_from(["key_norm", "key_dev"]), content=st.sampled_from([False, True, "sse", "kmeans"]),
       seed=st.integers(0, 10 ** 6))
def test_dynamic_assignment_rules(n, mfrac, nfixed, topk, score, content, seed):
    """Coverage (every token in exactly one segment, none empty), exactly m rows, the fixed
    anchors and the top-k tokens alone, the top-k the highest-scored of the others, and
    the rest in runs (token order)."""
    g = torch.Generator().manual_seed(seed)
    m = 1 + int(mfrac * (n - 1))
    fixed = sorted({0, n - 1}) [:nfixed] if m > 1 else []
    fixed = fixed[:max(0, m - 1)]
    k = torch.randn(3, n, 5, generator=g) * torch.rand(3, n, 1, generator=g) * 4
    seg_of, counts = dyn.assign(k, m, fixed, topk, score, content)
    assert counts.shape == (3, m) and bool((counts >= 1).all()) and counts.sum(1).tolist() == [n] * 3
    top = max(0, min(topk, m - len(fixed) - 1))
    m_rest = m - len(fixed) - top
    for b in range(3):
        segs = dyn.segments_of(seg_of[b], 0)
        assert sorted(t for s in segs for t in s) == list(range(n))           # coverage
        singles = [s[0] for s in segs[m_rest:]]
        assert all(len(s) == 1 for s in segs[m_rest:]) and singles == sorted(singles)
        assert set(fixed) <= set(singles) and len(singles) == len(fixed) + top
        others = [t for t in range(n) if t not in fixed]
        kf = k[b].float()
        sc = kf.norm(dim=-1) if score == "key_norm" else (kf - kf.mean(0)).norm(dim=-1)
        chosen = set(singles) - set(fixed)
        if chosen:                                                            # the top-k of the score
            assert min(sc[t] for t in chosen) >= max([sc[t] for t in others if t not in chosen] or [-1e9]) - 1e-6
        rest = [t for t in range(n) if t not in singles]
        order = [t for s in segs[:m_rest] for t in s]
        if content == "kmeans":                                               # groups, any shape
            assert sorted(order) == rest
        else:
            assert order == rest                                              # runs in token order
        if not content:
            from prism_kernels.plan import split_sizes
            assert [len(s) for s in segs[:m_rest]] == split_sizes(len(rest), m_rest)


@pytest.mark.parametrize("content", [True, "sse"])
def test_content_boundaries_at_the_largest_jumps(content):
    d = torch.randn(6, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([0., 0., 10., 10., 10., 30.])
    k = (level[:, None] * d + 0.01 * torch.arange(6.)[:, None])[None]
    seg_of, counts = dyn.assign(k, 3, (), 0, "key_norm", content=content)
    assert dyn.segments_of(seg_of[0], 0) == [(0, 1), (2, 3, 4), (5,)]


@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 9), mfrac=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6))
def test_sse_runs_are_optimal(R, mfrac, seed):
    """sse_boundaries against every split of R tokens into m runs."""
    import itertools
    m = 1 + int(mfrac * (R - 1))
    x = torch.randn(2, R, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def sse(row, cuts):
        b = [0, *cuts, R]
        return sum(float(((row[i:j] - row[i:j].mean(0)) ** 2).sum()) for i, j in zip(b, b[1:]))
    starts = dyn.sse_boundaries(x, m)
    for b in range(2):
        cuts = starts[b].nonzero().flatten().tolist()
        assert len(cuts) == m - 1 and 0 not in cuts
        best = min(sse(x[b], c) for c in itertools.combinations(range(1, R), m - 1))
        assert sse(x[b], cuts) <= best + 1e-9


def _plant(seed=0, B=2, N=12, H=2, d=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("policy", ["topk", "content", "content_sse"])
def test_dynamic_layer_against_python_ref(policy, causal):
    """simulate_prism with data-dependent segments against python_ref's plan_from_segments
    on segments written out by hand, one plan per sequence (12 tokens, P = 2, m = 3)."""
    from prism_kernels.hf.attention import simulate_prism
    q, k, v = _plant()
    if policy == "topk":
        cfg = PrismConfig(2, num_means=3, anchors="special+topk", anchor_topk=1, anchor_score="key_norm",
                          segments="runs", backend="torch", count_bias="log")
        for b, (t0, t1) in enumerate([(3, 8), (2, 10)]):                       # planted large keys
            k[b, :, t0] *= 20
            k[b, :, t1] *= 20
        segs = [[[[0], [1, 2, 4, 5], [3]], [[6, 7, 9], [10, 11], [8]]],
                [[[0], [1, 3, 4, 5], [2]], [[6, 7, 8], [9, 11], [10]]]]
    else:
        cfg = PrismConfig(2, num_means=3, anchors="none", segments=policy, backend="torch", count_bias="log")
        dirs = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        lv = [[0, 0, 10, 10, 10, 30, 0, 5, 5, 5, 25, 25], [0, 20, 20, 20, 20, 5, 0, 0, 0, 0, 15, 40]]
        for b in range(2):
            k[b] = torch.tensor(lv[b], dtype=torch.float64)[:, None] * dirs[0] + 0.01 * k[b]
        segs = [[[[0, 1], [2, 3, 4], [5]], [[6], [7, 8, 9], [10, 11]]],
                [[[0], [1, 2, 3, 4], [5]], [[6, 7, 8, 9], [10], [11]]]]
    out = simulate_prism(q, k, v, config=cfg, causal=causal, scale=0.5)              # [B, N, H, d]
    _check_against_python_ref(out, q, k, v, segs, [6, 6], causal)


def _check_against_python_ref(out, q, k, v, segs, sizes, causal):
    from python_ref import device_keys_values, device_tensors, duplicated_attention, plan_from_segments
    for b in range(len(segs)):
        plan = plan_from_segments(sum(sizes), sizes, segs[b], causal=causal)
        for i in range(len(sizes)):
            kt = device_keys_values(k[b:b + 1], plan, i)
            vt = device_keys_values(v[b:b + 1], plan, i)
            counts, qp, kp = device_tensors(plan, i)
            o, s = plan.offsets[i], plan.sizes[i]
            ref = duplicated_attention(q[b:b + 1, :, o:o + s], kt, vt, counts, causal=causal,
                                       q_pos=qp if causal else None, k_pos=kp if causal else None, scale=0.5)
            assert torch.allclose(out[b, o:o + s].transpose(0, 1), ref[0], atol=1e-10), (b, i)


def test_dynamic_policies_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="attention_input"):
        PrismConfig(2, compression_rate=4, anchors="special+topk", averaging="block_input")
    with pytest.raises(ValueError, match="count_bias"):
        PrismConfig(2, compression_rate=4, segments="content", count_bias="spread")
    with pytest.raises(ValueError, match="anchor_topk"):
        PrismConfig(2, compression_rate=4, anchors="special+topk", anchor_topk=-1)
    cfg = PrismConfig(2, compression_rate=4, segments="content")
    assert cfg.dynamic
    with pytest.raises(ValueError, match="no fixed plan.*static=True"):
        cfg.plan(20, False)                                  # its segments would not be the ones sent
    assert cfg.plan(20, False, static=True).means == (3, 3)
    assert not PrismConfig(2, compression_rate=4, anchors="special").dynamic


def test_auto_anchors_are_the_measured_best_that_the_settings_allow():
    """anchors="auto" (the default): special tokens + top-1 by key deviation, chosen per
    layer, under attention_input averaging and the log-count bias; the special tokens
    alone where the keys are not there to choose from (block_input averaging) or the
    bias is the spread experiment."""
    cfg = PrismConfig(2, compression_rate=4)
    assert (cfg.anchors, cfg.anchor_score, cfg.anchor_topk, cfg.segments) == ("special+topk", "auto", "auto", "auto")
    assert cfg.dynamic
    for kw in (dict(averaging="block_input"), dict(count_bias="spread")):
        c = PrismConfig(2, compression_rate=4, **kw)
        assert c.anchors == "special" and not c.dynamic, kw
    assert PrismConfig(2, compression_rate=4, anchors="none").anchors == "none"
    # the resolved policy is what the config holds and passes on
    assert PrismConfig.from_any(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="resolve"):
        resolve(10, BERT, "auto")


def test_auto_topk_is_one_on_a_patch_grid_and_six_for_text():
    """anchor_topk="auto": one top-k anchor where the tokens form a patch grid (images),
    six for text."""
    from prism_kernels.anchors import resolve_topk
    from prism_kernels.dynamic import assign, partition_segments
    from prism_kernels.plan import Partition, Segment

    assert resolve_topk("auto", (4, 4, 1)) == 1 and resolve_topk("auto", None) == 6
    assert resolve_topk(2, None) == 2 and resolve_topk(0, (4, 4, 1)) == 0
    cfg = PrismConfig(2, compression_rate=4)
    k = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    part = Partition(0, 0, 20, tuple(Segment(tuple(range(2 * i, 2 * i + 2))) for i in range(10)))
    seg_of, counts = partition_segments(cfg, k, part, fixed=(), grid=None)
    # text: the six tokens with the largest key deviation go alone (count 1), 4 runs for the rest
    dev = (k - k.mean(1, keepdim=True)).norm(dim=-1)
    for b in range(3):
        alone = sorted(int(t) for t in range(20) if seg_of[b, t] >= 4)     # anchors follow the runs
        assert all(counts[b, s] == 1 for s in range(4, 10))
        assert alone == sorted(dev[b].topk(6).indices.tolist()), b
    want, _ = assign(k, 10, (), 6, "key_dev", True)
    assert torch.equal(seg_of, want)
    for bad in (-1, 1.5, True, "four"):
        with pytest.raises(ValueError, match="anchor_topk must be 'auto' or an integer >= 0"):
            PrismConfig(2, compression_rate=4, anchor_topk=bad)


def test_topk_anchor_with_2d_blocks_against_python_ref():
    """ViT roles ([CLS] + 4 x 4 patches, 17 tokens), P = 2 (9 + 8), m = 4: [CLS] and the
    planted largest key alone, the other patches in 2-D blocks of the grid (bisection of
    each sequence's own remaining patches, the longer side first); segments by hand."""
    from prism_kernels.hf.attention import simulate_prism
    q, k, v = _plant(B=1, N=17)
    k[0, :, 6] *= 20
    k[0, :, 12] *= 20
    cfg = PrismConfig(2, num_means=4, anchors="special+topk", anchor_score="key_norm", backend="torch",
                      count_bias="log")
    out = simulate_prism(q, k, v, config=cfg, causal=False, scale=0.5, roles=VIT_4x4)
    segs = [[[[0], [6], [1, 2, 3, 5], [4, 7, 8]], [[9, 13], [10, 14], [11, 15, 16], [12]]]]
    _check_against_python_ref(out, q, k, v, segs, [9, 8], False)


def test_kmeans_groups_against_python_ref():
    """segments="kmeans": groups of similar keys, not contiguous; 12 tokens, P = 2, m = 3,
    keys planted on a line (levels), groups written out by hand."""
    from prism_kernels.hf.attention import simulate_prism
    q, k, v = _plant(B=1)
    d = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lv = torch.tensor([0, 0, 10, 30, 10, 0, 0, 5, 5, 5, 25, 25], dtype=torch.float64)
    k[0] = lv[:, None] * d + 0.01 * k[0]
    cfg = PrismConfig(2, num_means=3, anchors="none", segments="kmeans", backend="torch", count_bias="log")
    out = simulate_prism(q, k, v, config=cfg, causal=False, scale=0.5)
    segs = [[[[0, 1, 5], [2, 4], [3]], [[6], [7, 8, 9], [10, 11]]]]
    _check_against_python_ref(out, q, k, v, segs, [6, 6], False)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 30), mfrac=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6))
def test_kmeans_never_worse_than_runs(R, mfrac, seed):
    m = 1 + int(mfrac * (R - 1))
    x = torch.randn(2, R, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = dyn.kmeans_groups(x, m)
    from prism_kernels.plan import split_sizes
    runs = torch.repeat_interleave(torch.arange(m), torch.tensor(split_sizes(R, m)))

    def sse(row, lab):
        return sum(float(((row[lab == c] - row[lab == c].mean(0)) ** 2).sum()) for c in range(m))
    for b in range(2):
        assert sorted(set(g[b].tolist())) == list(range(m))                  # no group empty
        assert sse(x[b], g[b]) <= sse(x[b], runs) + 1e-9


def test_auto_score_is_the_key_norm_on_a_patch_grid_and_the_key_deviation_on_text():
    """anchor_score="auto": token 2 has the largest key, token 5 the key farthest from the
    partition's mean key; the top-1 anchor (the last segment, count 1) is token 2 when
    the tokens are patches of a grid and token 5 for text."""
    F = 4
    k = torch.full((1, 8, F), 10.0, dtype=torch.float64)
    k[0, 2] = 12.0
    k[0, 5] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    cfg = PrismConfig(1, num_means=3)
    part = cfg.plan(8, False, roles=TokenRoles(leading=0), static=True).partitions[0]
    for grid, want in (((2, 4, 0), 2), (None, 5)):
        seg_of, counts = dyn.partition_segments(cfg, k, part, (), grid)
        assert counts[0, -1] == 1 and int((seg_of[0] == 2).nonzero()) == want, (grid, seg_of)
    explicit = PrismConfig(1, num_means=3, anchor_score="key_dev")
    seg_of, _ = dyn.partition_segments(explicit, k, part, (), (2, 4, 0))
    assert int((seg_of[0] == 2).nonzero()) == 5             # a given score is used as given


def test_a_partition_without_a_choice_sends_the_static_segments():
    """dynamic.chooses: rows for a top-k anchor or a content cut beside the special tokens
    (m_j >= specials + 2) leave a choice; m_j = 1, or one mean beside the anchors, do
    not (the runtime then sends the plan's segments, without counts)."""
    bert = TokenRoles(leading=1, trailing=1)
    # partition 0 (tokens 0-5) holds [CLS], partition 1 (6-11) [SEP]
    for m, first, last in ((1, False, False), (2, False, False), (3, True, True)):
        cfg = PrismConfig(2, num_means=m)
        plan = cfg.plan(12, False, roles=bert, static=True)
        anchors, grid = resolve(12, bert, cfg.anchors, cfg.segments)
        got = [dyn.chooses(cfg, p, dyn.fixed_anchors(p, anchors), grid) for p in plan.partitions]
        assert got == [first, last], (m, got)
        assert dyn.counted_rows(cfg, plan, anchors, grid) == [m if last else 0, m if first else 0]
    text = TokenRoles(leading=1)                    # a decoder: token 0 only; partition 1 has no anchor
    cfg = PrismConfig(2, num_means=2)
    plan = cfg.plan(12, True, roles=text, static=True)
    anchors, grid = resolve(12, text, cfg.anchors, cfg.segments)
    assert [dyn.chooses(cfg, p, dyn.fixed_anchors(p, anchors), grid) for p in plan.partitions] == [False, True]
    full = PrismConfig(2, num_means=6)                # every token alone: counts all 1, nothing to send
    assert not any(dyn.chooses(full, p, (), None) for p in full.plan(12, False, roles=bert, static=True).partitions)
    static = PrismConfig(2, num_means=4, anchors="special")
    plan = static.plan(12, False, roles=bert)
    assert not any(dyn.chooses(static, p, (), None) for p in plan.partitions)

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
    plan = PrismConfig(2, num_means=3).plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2], [3, 4]], [[5, 6], [7, 8], [9]]]
    assert plan.means == (3, 3)


def test_extra_budget_adds_the_anchors():
    plan = PrismConfig(2, num_means=2, anchor_budget="extra").plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2], [3, 4]], [[5, 6], [7, 8], [9]]]
    plan = PrismConfig(2, num_means=2).plan(10, False, roles=BERT)
    assert segments(plan) == [[[0], [1, 2, 3, 4]], [[5, 6, 7, 8], [9]]]


def test_policies_first_and_none():
    assert segments(PrismConfig(2, num_means=2, anchors="first").plan(10, False, roles=BERT)) == \
        [[[0], [1, 2, 3, 4]], [[5, 6, 7], [8, 9]]]
    assert segments(PrismConfig(2, num_means=2, anchors="none").plan(10, False, roles=BERT)) == \
        [[[0, 1, 2], [3, 4]], [[5, 6, 7], [8, 9]]]


def test_shared_budget_sends_exactly_m_rows():
    # [CLS] and [SEP] in one partition of m = 2: [CLS] alone, [SEP] averaged; m = 1: one plain mean
    assert segments(PrismConfig(1, num_means=2).plan(6, False, roles=BERT)) == [[[0], [1, 2, 3, 4, 5]]]
    assert segments(PrismConfig(1, num_means=1).plan(6, False, roles=BERT)) == [[[0, 1, 2, 3, 4, 5]]]
    assert segments(PrismConfig(1, num_means=1, anchor_budget="extra").plan(6, False, roles=BERT)) == \
        [[[0], [1, 2, 3, 4], [5]]]


def test_vit_blocks_of_the_patch_grid():
    # 4 x 4 patches (tokens 1..16, row-major) after [CLS]; P = 2: tokens 0..8 and 9..16
    plan = PrismConfig(2, num_means=3).plan(17, False, roles=VIT_4x4)
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
    plan = PrismConfig(3, compression_rate=2.5).plan(17, True, roles=lookup("llama").roles(None))
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

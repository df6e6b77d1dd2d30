"""The segment plan (prism_kernels.plan): properties on random inputs, and agreement
with the independent layout of the oracle (python_ref.layout)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import python_ref as R
from prism_kernels import plan as P
from tolerances import assert_close


@st.composite
def plans(draw):
    n = draw(st.integers(1, 60))
    parts = draw(st.integers(1, min(n, 6)))
    causal = draw(st.booleans())
    extra = {}
    if draw(st.booleans()):
        extra["anchors"] = draw(st.lists(st.integers(0, n - 1), max_size=4))
    if n >= 5 and draw(st.booleans()):
        first = draw(st.integers(0, 2))
        cols = draw(st.integers(1, max(1, (n - first) // 2)))
        extra["grid"] = (max(1, (n - first) // cols), cols, first)
    if draw(st.booleans()):
        return P.make_plan(n, parts, compression_rate=draw(st.floats(1, 80)), causal=causal, **extra)
    if draw(st.booleans()):
        w = draw(st.lists(st.floats(0.1, 10), min_size=parts, max_size=parts))
        return P.make_plan(n, weights=w, num_means=draw(st.integers(1, 20)), causal=causal, **extra)
    return P.make_plan(n, parts, draw(st.integers(1, 20)), causal=causal, **extra)


@given(plans())
def test_segments_cover_every_token_once_with_counts_and_last_positions(plan):
    assert sum(plan.sizes) == plan.n_tokens and all(s >= 1 for s in plan.sizes)
    covered = []
    for part, o, n in zip(plan.partitions, plan.offsets, plan.sizes):
        assert sum(part.counts) == n                       # counts sum to the partition size
        assert 1 <= part.num_segments <= n
        for seg in part.segments:
            assert seg.count == len(seg.tokens) >= 1
            assert seg.position == max(seg.tokens)          # a mean sits at its last token
            assert all(o <= t < o + n for t in seg.tokens)  # inside its partition
            covered += seg.tokens
    assert sorted(covered) == list(range(plan.n_tokens))    # every token exactly once


@given(plans())
def test_causal_visibility_is_right_for_every_query(plan):
    """A query at global position t sees a key iff every token the key stands for is <= t
    (own tokens: the usual causal rule; means: the whole segment is in its past)."""
    for dev in plan.devices:
        key_tokens = [(t,) for t in range(dev.offset, dev.offset + dev.size)]
        for j in dev.sources:
            key_tokens += [seg.tokens for seg in plan.partitions[j].segments]
        assert len(key_tokens) == dev.num_keys
        assert dev.counts == tuple(len(k) for k in key_tokens)
        if plan.causal:
            assert all(j < dev.index for j in dev.sources)   # later partitions are never sent
        else:
            assert set(dev.sources) == set(range(plan.num_partitions)) - {dev.index}
        for t in dev.query_positions:
            for toks, kpos in zip(key_tokens, dev.key_positions):
                assert (kpos <= t) == all(x <= t for x in toks)
        # in causal mode no key is invisible to the whole device (nothing useless is sent)
        if plan.causal:
            assert all(k <= dev.offset + dev.size - 1 for k in dev.key_positions)


@given(st.integers(1, 80), st.integers(1, 6), st.floats(1, 100), st.booleans())
def test_equal_split_matches_the_oracle_layout(n, parts, cr, causal):
    parts = min(parts, n)
    ours = P.make_plan(n, parts, compression_rate=cr, causal=causal)
    ref = R.plan_layout(n, parts, compression_rate=cr, causal=causal)
    assert ours.sizes == ref.sizes and ours.offsets == ref.offsets and ours.means == ref.means
    for a, b in zip(ours.devices, ref.devices):
        assert (a.sources, a.counts, a.key_positions) == (b.sources, b.counts, b.key_positions)


@given(st.integers(1, 500), st.lists(st.floats(0.05, 20), min_size=1, max_size=8))
def test_proportional_sizes(n, weights):
    weights = weights[:n]
    sizes = P.proportional_sizes(n, weights)
    assert sum(sizes) == n and all(s >= 1 for s in sizes)
    # each size is within one token (plus the guaranteed one) of its exact share
    free = n - len(weights)
    for s, w in zip(sizes, weights):
        assert abs((s - 1) - free * w / sum(weights)) < 1 + 1e-9


def test_proportional_sizes_equal_weights_is_the_equal_split_and_speed_shifts_tokens():
    for n in range(3, 40):
        assert P.proportional_sizes(n, [1, 1, 1]) == P.partition_sizes(n, 3)
    assert P.proportional_sizes(150, [1, 0.5]) == [100, 50]


def test_uneven_sizes_given_directly():
    plan = P.make_plan(10, sizes=[7, 3], num_means=2, causal=True)
    assert plan.offsets == (0, 7) and plan.means == (2, 2)
    assert plan.devices[1].counts == (1, 1, 1, 4, 3) and plan.devices[1].key_positions == (7, 8, 9, 3, 6)


def test_num_means_is_capped_per_partition():
    assert P.make_plan(10, sizes=[8, 2], num_means=4).means == (4, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=5, num_partitions=6, num_means=1), "num_partitions must be <= n_tokens"),
    (dict(n_tokens=5, num_partitions=2), "exactly one of num_means"),
    (dict(n_tokens=5, num_partitions=2, num_means=1, compression_rate=2), "exactly one of num_means"),
    (dict(n_tokens=5, num_partitions=2, compression_rate=0.5), "compression_rate must be a finite number >= 1"),
    (dict(n_tokens=5, num_partitions=2, compression_rate=float("nan")), "compression_rate"),
    (dict(n_tokens=5, sizes=[2, 2], num_means=1), "sum to n_tokens=5"),
    (dict(n_tokens=5, sizes=[5, 0], num_means=1), "sizes"),
    (dict(n_tokens=5, weights=[1, -1], num_means=1), "weights must be finite numbers > 0"),
    (dict(n_tokens=5, num_partitions=2, sizes=[3, 2], num_means=1), "exactly one of num_partitions"),
    (dict(n_tokens=5, num_partitions=2, num_means=[1, 2, 3]), "one value per partition"),
    (dict(n_tokens=5, num_partitions=2, num_means=[4, 1]), "num_segments must be <="),
    (dict(n_tokens=0, num_partitions=1, num_means=1), "n_tokens must be >= 1"),
    (dict(n_tokens=5, num_partitions=2, num_means=1, order=[0, 0]), "order must be a permutation"),
])
def test_bad_plans_are_refused_with_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.make_plan(**kwargs)


@pytest.mark.parametrize("i", [2, -1, 1.0, True])
def test_device_index_must_be_in_range(i):
    plan = P.make_plan(9, 2, 2)
    with pytest.raises(ValueError, match=r"device index must be an integer in \[0, 2\)"):
        P.device_tensors(plan, i)


def test_plans_are_cached_and_immutable():
    assert P.make_plan(100, 3, compression_rate=4) is P.make_plan(100, 3, compression_rate=4)
    with pytest.raises(Exception):
        P.make_plan(100, 3, compression_rate=4).sizes = (1,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partition_means_contiguous_equals_oracle(dtype):
    plan = P.make_plan(29, 3, compression_rate=3)
    x = torch.randn(2, 29, 5, dtype=dtype)
    for j, part in enumerate(plan.partitions):
        means, counts = P.partition_means(P.local_rows(x, plan, j), part)
        ref, rc = R.segment_means(R.local_rows(x, R.plan_layout(29, 3, compression_rate=3), j), part.num_segments)
        assert torch.equal(counts, rc)
        assert_close(means, ref)


def test_partition_means_of_scattered_segments():
    """Segments need not be contiguous (the plan can send some tokens alone)."""
    part = P.Partition(1, 10, 5, (P.Segment((10,)), P.Segment((11, 13, 14)), P.Segment((12,))))
    assert not part.contiguous and part.positions == (10, 14, 12)
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    means, counts = P.partition_means(x, part)
    assert counts.tolist() == [1, 3, 1]
    expect = torch.stack([x[:, 0], x[:, [1, 3, 4]].mean(1), x[:, 2]], dim=1)
    assert_close(means, expect)
    means.sum().backward()
    assert_close(x.grad[0, :, 0], torch.tensor([1, 1 / 3, 1, 1 / 3, 1 / 3], dtype=torch.float64))


def test_device_keys_values_matches_oracle():
    plan = P.make_plan(17, 3, 2, causal=True)
    x = torch.randn(17, 4, dtype=torch.float64)
    ref_plan = R.plan_layout(17, 3, 2, causal=True)
    for i in range(3):
        assert_close(P.device_keys_values(x, plan, i), R.device_keys_values(x, ref_plan, i))


def test_anchors_are_sent_alone_from_the_same_budget():
    plan = P.make_plan(20, 2, 3, anchors=[0, 12])
    segs = [[s.tokens for s in p.segments] for p in plan.partitions]
    assert segs[0][0] == (0,) and (12,) in segs[1]
    assert plan.means == (3, 3)                       # same number of rows as without anchors
    assert all(12 not in s for s in segs[1] if s != (12,))
    # the non-anchor tokens around an anchor still form runs of consecutive non-anchors
    assert segs[1] == [(10, 11, 13, 14, 15), (12,), (16, 17, 18, 19)]


def test_shared_budget_keeps_m_rows_extra_adds_the_anchors():
    segs = lambda plan: [s.tokens for s in plan.partitions[0].segments]
    assert segs(P.make_plan(10, 1, 1, anchors=[0, 1])) == [tuple(range(10))]
    assert segs(P.make_plan(10, 1, 2, anchors=[0, 1])) == [(0,), tuple(range(1, 10))]
    assert segs(P.make_plan(10, 1, 1, anchors=[0, 1], anchor_budget="extra")) == [(0,), (1,), tuple(range(2, 10))]
    with pytest.raises(ValueError, match="anchor_budget"):
        P.make_plan(10, 1, 1, anchor_budget="more")


def test_grid_segments_are_2d_blocks():
    """A 16 x 16 patch grid after [CLS]: one partition's 4 segments are its 8 x 8 quadrants."""
    plan = P.make_plan(257, 1, 5, anchors=[0], grid=(16, 16, 1))
    blocks = [s.tokens for s in plan.partitions[0].segments if s.tokens != (0,)]
    assert len(blocks) == 4
    for b in blocks:
        rows = {(t - 1) // 16 for t in b}
        cols = {(t - 1) % 16 for t in b}
        assert len(b) == 64 and len(rows) == 8 and len(cols) == 8
    # without the grid the same budget gives strips of 4 whole rows
    strips = [s.tokens for s in P.make_plan(257, 1, 5, anchors=[0]).partitions[0].segments][1:]
    assert all(len({(t - 1) // 16 for t in b}) == 4 for b in strips)


def test_grid_must_fit():
    with pytest.raises(ValueError, match="grid"):
        P.make_plan(10, 2, 2, grid=(4, 4, 0))

"""Device layouts (docs/method.md, "Causal mask"): CR = 1 is exact, block order is irrelevant,
and the partition-aware causal mask is the right one (paper Fig. 3)."""
import pytest
import torch
import torch.nn.functional as F

import python_ref as R
from tolerances import assert_close


def _simulate(q, k, v, plan, causal):
    """Run every device of `plan` with the reference; concatenate their outputs."""
    outs = []
    for i, dev in enumerate(plan.devices):
        counts, q_pos, k_pos = R.device_tensors(plan, i)
        kw = dict(causal=True, q_pos=q_pos, k_pos=k_pos) if causal else {}
        outs.append(R.prism_attention(R.local_rows(q, plan, i), R.device_keys_values(k, plan, i),
                                      R.device_keys_values(v, plan, i), key_counts=counts, **kw))
    return torch.cat(outs, dim=-2)


@pytest.mark.parametrize("P", [1, 2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_cr1_reproduces_full_attention(P, causal):
    N = 23
    q, k, v = (torch.randn(2, 4, N, 16, dtype=torch.float64) for _ in range(3))
    plan = R.plan_layout(N, P, compression_rate=1, causal=causal)
    assert all(m == n for m, n in zip(plan.means, plan.sizes))
    out = _simulate(q, k, v, plan, causal)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_p1_is_exactly_the_stock_attention():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    plan = R.plan_layout(9, 1, num_means=1)
    assert plan.devices[0].sources == () and plan.devices[0].counts == (1,) * 9
    out = _simulate(q, k, v, plan, False)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_permuting_received_blocks_changes_nothing(causal):
    """Eq. 5: attention is invariant to permuting key/value rows together."""
    N, P = 31, 4
    q, k, v = (torch.randn(1, 2, N, 8, dtype=torch.float64) for _ in range(3))
    a = _simulate(q, k, v, R.plan_layout(N, P, num_means=3, causal=causal), causal)
    b = _simulate(q, k, v, R.plan_layout(N, P, num_means=3, causal=causal, order=[3, 1, 0, 2]), causal)
    assert_close(a, b)


def test_causal_layout_drops_later_partitions_and_places_means_at_last_token():
    plan = R.plan_layout(10, 3, num_means=2, causal=True)
    assert [d.sources for d in plan.devices] == [(), (0,), (0, 1)]
    dev = plan.devices[2]                      # offsets 0, 4, 7; sizes 4, 3, 3
    assert dev.counts == (1, 1, 1, 2, 2, 2, 1)
    assert dev.key_positions == (7, 8, 9, 1, 3, 5, 6)
    assert R.plan_layout(10, 3, num_means=2).devices[0].sources == (1, 2)


def test_naive_local_causal_mask_is_wrong_partition_aware_is_right():
    """Paper Fig. 3b vs 3c, at CR = 1 where Prism must equal full causal attention."""
    N, P = 12, 3
    q, k, v = (torch.randn(1, 2, N, 8, dtype=torch.float64) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    plan = R.plan_layout(N, P, compression_rate=1, causal=True)
    assert_close(_simulate(q, k, v, plan, True), full)
    # Naive: each device applies tril on its local indices to [own ; received] keys.
    naive = []
    for i, dev in enumerate(plan.devices):
        kk, vv = R.device_keys_values(k, plan, i), R.device_keys_values(v, plan, i)
        mask = torch.ones(dev.size, dev.num_keys, dtype=torch.bool).tril()
        naive.append(F.scaled_dot_product_attention(R.local_rows(q, plan, i), kk, vv, attn_mask=mask))
    naive = torch.cat(naive, dim=-2)
    assert (naive - full).abs().max() > 1e-2


def test_num_means_variants():
    plan = R.plan_layout(20, 3, num_means=[2, 3, 1])
    assert plan.means == (2, 3, 1) and plan.devices[0].tokens_received == 4
    plan = R.plan_layout(256, 2, compression_rate=10)
    assert plan.means == (13, 13)
    with pytest.raises(ValueError, match="exactly one"):
        R.plan_layout(20, 2)
    with pytest.raises(ValueError, match="num_segments"):
        R.plan_layout(20, 3, num_means=8)        # partitions of 7, 7, 6 tokens
    with pytest.raises(ValueError, match="one value per partition"):
        R.plan_layout(20, 3, num_means=[1, 2])

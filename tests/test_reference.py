"""The reference is the SPEC in code; these tests tie it to the paper's claims."""
import math

import pytest
import torch
import torch.nn.functional as F

import python_ref as R
from tolerances import assert_close


@pytest.mark.parametrize("n,m", [(10, 3), (7, 7), (7, 1), (13, 5), (1, 1), (100, 9)])
def test_segment_sizes_follow_tensor_split(n, m):
    x = torch.randn(2, n, 4)
    means, counts = R.segment_means(x, m)
    parts = torch.tensor_split(x, m, dim=-2)
    assert counts.tolist() == [p.shape[-2] for p in parts]
    assert int(counts.sum()) == n
    assert_close(means, torch.stack([p.mean(-2) for p in parts], dim=-2), torch.float32)


def test_segment_means_edge_cases():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    means, counts = R.segment_means(x, 5)          # m = n: every mean is one token
    assert torch.equal(means, x) and counts.tolist() == [1] * 5
    means, counts = R.segment_means(x, 1)          # m = 1: the partition mean
    assert_close(means[..., 0, :], x.mean(-2)) and counts.tolist() == [5]


def test_partition_sizes_and_num_means():
    assert R.partition_sizes(10, 3) == [4, 3, 3]
    assert R.partition_sizes(197, 2) == [99, 98]
    assert R.partition_sizes(5, 5) == [1] * 5
    # Eq. 16: m = min(n, max(1, ceil(n / CR)))
    assert R.num_means(128, 10) == 13
    assert R.num_means(128, 1) == 128
    assert R.num_means(5, 1000) == 1
    assert R.num_means(99, 9.9) == 10


def _rand_attn(B, H, Hkv, Nq, Nk, d, dtype=torch.float64):
    return (torch.randn(B, H, Nq, d, dtype=dtype), torch.randn(B, Hkv, Nk, d, dtype=dtype),
            torch.randn(B, Hkv, Nk, d, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_counts", [False, True])
def test_scaling_aware_equals_duplication(causal, batch_counts):
    """Eq. 12-15 == Eq. 11: softmax(S + log c) V equals attention over duplicated rows."""
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, Nq, Nk, d = 2, 4, 2, 6, 9, 8
    q, k, v = _rand_attn(B, H, Hkv, Nq, Nk, d)
    shape = (B, Nk) if batch_counts else (Nk,)
    counts = torch.randint(1, 6, shape, generator=g)
    kw = {}
    if causal:
        kw = dict(causal=True, q_pos=torch.arange(10, 10 + Nq),
                  k_pos=torch.randint(0, 16, (Nk,), generator=g))
    out = R.prism_attention(q, k, v, key_counts=counts, **kw)
    ref = R.duplicated_attention(q, k, v, counts, **kw)
    assert_close(out, ref)


def test_all_ones_counts_is_plain_attention():
    q, k, v = _rand_attn(1, 3, 3, 7, 7, 16)
    out = R.prism_attention(q, k, v, key_counts=torch.ones(7))
    assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out = R.prism_attention(q, k, v, causal=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_fully_masked_row_gives_zeros_and_neg_inf_lse():
    q, k, v = _rand_attn(1, 2, 1, 3, 4, 8)
    out, lse = R.prism_attention(q, k, v, causal=True, q_pos=torch.tensor([0, 5, 9]),
                                 k_pos=torch.tensor([1, 2, 3, 4]), return_lse=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.isinf(lse[:, :, 0]).all() and (lse[:, :, 0] < 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 1:]).all()


def test_lse_matches_logsumexp_and_merges_partial_results():
    """Attention over [K1; K2] equals the lse-weighted merge of the two halves."""
    q, k, v = _rand_attn(2, 2, 2, 5, 10, 8)
    c = torch.randint(1, 4, (10,))
    full = R.prism_attention(q, k, v, key_counts=c)
    o1, l1 = R.prism_attention(q, k[:, :, :6], v[:, :, :6], key_counts=c[:6], return_lse=True)
    o2, l2 = R.prism_attention(q, k[:, :, 6:], v[:, :, 6:], key_counts=c[6:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp().unsqueeze(-1) + o2 * (l2 - lse).exp().unsqueeze(-1)
    assert_close(merged, full)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8) + c.double().log()
    assert_close(torch.logaddexp(l1, l2), torch.logsumexp(s, -1))

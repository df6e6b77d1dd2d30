"""Backward of prism::attention (used for fine-tuning with Prism in the loop)."""
import pytest
import torch

import prism_kernels as pk


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
def test_gradcheck_fp64(causal, with_lse):
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, Nq, Nk, d = 2, 4, 2, 5, 7, 6
    q = torch.randn(B, H, Nq, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, d, dtype=torch.float64, generator=g, requires_grad=True)
    counts = (torch.rand(B, Nk, dtype=torch.float64, generator=g) * 4 + 1).requires_grad_(True)
    kw = {}
    if causal:  # query 0 sees nothing (zeros, no gradient), others see a prefix of keys
        kw = dict(causal=True, q_pos=torch.tensor([0, 4, 5, 6, 7]), k_pos=torch.tensor([4, 5, 6, 7, 8, 1, 3]))

    def f(q, k, v, c):
        if not with_lse:
            return pk.prism_attention(q, k, v, key_counts=c, **kw)
        out, lse = pk.prism_attention(q, k, v, key_counts=c, return_lse=True, **kw)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, counts))


@pytest.mark.parametrize("n,m", [(7, 3), (5, 5), (6, 1)])
def test_segment_means_gradcheck(n, m):
    x = torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pk.segment_means(x, m)[0], (x,))

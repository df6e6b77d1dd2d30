"""The prism ops are real torch.library ops: fake kernels, torch.compile, opcheck."""
import os

import pytest
import torch

import prism_kernels as pk
import python_ref as R
from tolerances import assert_close


def test_ops_are_registered_with_fake_kernels():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    torch.library.opcheck(torch.ops.prism.attention.default,
                          (q, k, v, torch.zeros(1, 7), torch.arange(5)[None] + 3, torch.arange(7)[None], 0.3))
    torch.library.opcheck(torch.ops.prism.attention.default, (q, k, v, None, None, None, 0.3))
    torch.library.opcheck(torch.ops.prism.segment_means.default, (torch.randn(2, 9, 4), 4))
    # the backend argument: every backend is the same op to autograd / compile
    for backend in ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []):
        torch.library.opcheck(torch.ops.prism.attention.default,
                              (q, k, v, torch.zeros(1, 7), None, None, 0.3, backend))
        torch.library.opcheck(torch.ops.prism.segment_means.default,
                              (torch.randn(2, 9, 16), 4, backend))


def test_meta_tensors_give_shapes():
    q, k, v = (torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta"),
               torch.empty(2, 2, 7, 8, device="meta"))
    out, lse = torch.ops.prism.attention(q, k, v, None, None, None, 0.5)
    assert out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    means, counts = torch.ops.prism.segment_means(torch.empty(3, 10, 4, device="meta"), 3)
    assert means.shape == (3, 3, 4) and counts.shape == (3,)


def test_torch_compile_fullgraph():
    def device_block(x, q, k, v, counts, q_pos, k_pos):
        means, _ = pk.segment_means(x, 3)
        out = pk.prism_attention(q, k, v, key_counts=counts, causal=True, q_pos=q_pos, k_pos=k_pos)
        return out * 2 + means.sum()

    args = (torch.randn(10, 8), torch.randn(1, 4, 6, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16),
            torch.randint(1, 4, (9,)), torch.arange(6) + 10, torch.randint(0, 16, (9,)))
    compiled = torch.compile(device_block, fullgraph=True)
    assert_close(compiled(*args), device_block(*args), torch.float32)


def test_torch_compile_backward():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    c = torch.randint(1, 4, (6,))
    f = lambda q, k, v: pk.prism_attention(q, k, v, key_counts=c).square().sum()
    torch.compile(f, fullgraph=True)(q, k, v).backward()
    g1 = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    R_out = R.prism_attention(q, k, v, key_counts=c).square().sum()
    R_out.backward()
    for a, t in zip(g1, (q, k, v)):
        assert_close(a, t.grad, torch.float32, atol=1e-4, rtol=1e-4)

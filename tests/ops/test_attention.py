"""prism::attention, forward and backward, for every backend x dtype, against the fp64 oracle.

The matrix test draws random shapes (hypothesis): batch, grouped heads, odd
Nq / Nk, head dims 8..64, with or without (float, differentiable) counts,
causal with unsorted positions. Inputs are rounded to the dtype first and the
oracle (python_ref, fp64, differentiated by torch.autograd) sees the same
rounded values, so the only error measured is the kernel's. Tolerances:
tests/tolerances.py (TOL forward, GRAD_TOL backward).

Below the matrix: the public dispatch end to end (auto, reference alias,
use_backend), gradcheck in fp64, and the checks' error messages.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref as R
from op_backends import HAS_TRITON, INTERPRET, combos, examples
from tolerances import assert_close, assert_grad_close

TRITON = HAS_TRITON and (INTERPRET or torch.cuda.is_available())
BACKENDS = ["auto", "torch"] + (["cpp"] if pk.cpp_variant() else [])


@st.composite
def attention_case(draw, max_n=24, max_heads=2):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, max_heads))
    H = Hkv * draw(st.integers(1, max_heads))
    Nq = draw(st.integers(1, max_n))
    Nk = draw(st.integers(1, max_n))
    d = draw(st.sampled_from([8, 16, 32, 64]))
    causal = draw(st.booleans())
    with_counts = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, Hkv, Nq, Nk, d, causal, with_counts, seed


def _matrix_inputs(case, dtype, device):
    """Rounded inputs; with causal, every query sees at least one key (the
    oracle's gradient is NaN on rows with none; those are gradchecked below)."""
    B, H, Hkv, Nq, Nk, d, causal, with_counts, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    kw = {}
    if with_counts:
        kw["key_counts"] = torch.rand(B, Nk, generator=g, dtype=torch.float64) * 7 + 1
    if causal:  # unsorted key positions; query positions >= the smallest key position
        k_pos = torch.randint(0, 2 * max(Nq, Nk), (B, Nk), generator=g)
        q_pos = k_pos.min() + torch.randint(0, 2 * max(Nq, Nk), (Nq,), generator=g)
        kw.update(causal=True, q_pos=q_pos, k_pos=k_pos)
    d_out = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    d_lse = torch.randn(B, H, Nq, generator=g, dtype=torch.float64)
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return (to(q), to(k), to(v), {n: to(t) for n, t in kw.items()}, to(d_out), to(d_lse))


def _forward_backward(fn, q, k, v, kw, d_out, d_lse, counts_dtype):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kw = dict(kw)
    leaves = [q, k, v]
    if "key_counts" in kw:
        kw["key_counts"] = kw["key_counts"].to(counts_dtype).requires_grad_(True)
        leaves.append(kw["key_counts"])
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out.double() * d_out).sum() + (lse.double() * d_lse).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), lse.detach(), grads


def _check_matrix_case(case, backend, device, dtype):
    q, k, v, kw, d_out, d_lse = _matrix_inputs(case, dtype, device)
    counts_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out, lse, grads = _forward_backward(
        lambda *a, **k_: pk.prism_attention(*a, backend=backend, **k_),
        q, k, v, kw, d_out, d_lse, counts_dtype)
    ref, ref_lse, ref_grads = _forward_backward(
        R.prism_attention, q.double(), k.double(), v.double(), kw, d_out, d_lse, torch.float64)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, dtype)
    for name, g, rg in zip(["dq", "dk", "dv", "dcounts"], grads, ref_grads):
        assert g.dtype == (dtype if name != "dcounts" else counts_dtype), name
        assert_grad_close(g, rg, dtype)


@pytest.mark.parametrize("backend,device,dtype", combos())
def test_attention_forward_backward(backend, device, dtype):
    @settings(max_examples=examples(backend, device))
    @given(case=attention_case())
    def run(case):
        _check_matrix_case(case, backend, device, dtype)
    run()


def test_triton_backend_returns_gradients():
    """backend='triton' used to bypass the op, so its output had no grad_fn."""
    if not TRITON:
        pytest.skip("needs Triton with a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 2, 5, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 7, 16, device=device, requires_grad=True)
    v = torch.randn(1, 2, 7, 16, device=device, requires_grad=True)
    out = pk.prism_attention(q, k, v, key_counts=torch.randint(1, 4, (7,), device=device),
                             backend="triton")
    assert out.grad_fn is not None
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------- public dispatch (moved
# from test_backends_agree.py): every backend that exists agrees with the oracle

def dispatch_case(max_n=40):
    return attention_case(max_n=max_n, max_heads=3)


def _dispatch_inputs(case):
    B, H, Hkv, Nq, Nk, d, causal, with_counts, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    kw = {}
    if with_counts:
        kw["key_counts"] = torch.randint(1, 20, (B, Nk), generator=g)
    if causal:  # arbitrary (unsorted) global positions, as a device's keys have
        kw.update(causal=True, q_pos=torch.randint(0, 2 * max(Nq, Nk), (Nq,), generator=g),
                  k_pos=torch.randint(0, 2 * max(Nq, Nk), (B, Nk), generator=g))
    return q, k, v, kw


def _check_dispatch(case, backend, dtype):
    q, k, v, kw = _dispatch_inputs(case)
    expected, lse_ref = R.prism_attention(q, k, v, return_lse=True, **kw)
    out, lse = pk.prism_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend,
                                  return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], lse_ref[finite], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@settings(max_examples=10)
@given(case=dispatch_case())
def test_attention_backends_agree(backend, dtype, case):
    _check_dispatch(case, backend, dtype)


@pytest.mark.skipif(not TRITON, reason="triton not installed")
@settings(max_examples=6)
@given(case=dispatch_case(max_n=20))
def test_attention_triton_agrees(case):
    _check_dispatch(case, "triton", torch.float32)


def test_use_backend_selects_and_backend_argument_wins(monkeypatch):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    c = torch.randint(1, 4, (6,))
    calls = []
    from prism_kernels import torch_backend
    real = torch_backend.attention
    monkeypatch.setattr(torch_backend, "attention", lambda *a: calls.append(1) or real(*a))
    assert pk.selected_backend() == "auto"
    with pk.use_backend("torch"):
        assert pk.selected_backend() == "torch"
        out = pk.prism_attention(q, k, v, key_counts=c)
        assert len(calls) == 1
        if pk.cpp_variant():
            pk.prism_attention(q, k, v, key_counts=c, backend="cpp")   # explicit wins
            assert len(calls) == 1
    assert pk.selected_backend() == "auto"
    assert_close(out, R.prism_attention(q.double(), k.double(), v.double(), key_counts=c),
                 torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        with pk.use_backend("fast"):
            pass


def test_compiled_call_uses_the_backend_selected_at_run_time(monkeypatch):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    calls = []
    from prism_kernels import torch_backend
    real = torch_backend.attention
    monkeypatch.setattr(torch_backend, "attention", lambda *a: calls.append(1) or real(*a))
    f = torch.compile(lambda q, k, v: pk.prism_attention(q, k, v), fullgraph=True)
    expected = f(q, k, v)
    with pk.use_backend("torch"):
        out = f(q, k, v)
    assert calls and torch.allclose(out, expected, atol=1e-5)
    g = torch.compile(lambda q, k, v: pk.prism_attention(q, k, v, backend="torch"), fullgraph=True)
    n = len(calls)
    g(q, k, v)
    assert len(calls) == n + 1


def test_backend_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.prism_attention(q, q, q, backend="cuda")
    if not torch.cuda.is_available() and not INTERPRET:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            pk.prism_attention(q, q, q, backend="triton")
    if TRITON:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q64 = q.double().to(dev)
        with pytest.raises(ValueError, match="float64"):
            pk.prism_attention(q64, q64, q64, backend="triton")


# ---------------------------------------------------------------- gradcheck (moved from
# test_autograd.py): fp64, incl. a query row with no visible key

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
def test_gradcheck_fp64(causal, with_lse, backend):
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
            return pk.prism_attention(q, k, v, key_counts=c, backend=backend, **kw)
        out, lse = pk.prism_attention(q, k, v, key_counts=c, return_lse=True, backend=backend, **kw)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, counts))


# ---------------------------------------------------------------- the oracle itself (moved
# from test_reference.py): tied to the paper's claims

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
    assert_close(pk.prism_attention(q, k, v, key_counts=counts, **kw), ref)


def test_all_ones_counts_is_plain_attention():
    q, k, v = _rand_attn(1, 3, 3, 7, 7, 16)
    out = R.prism_attention(q, k, v, key_counts=torch.ones(7))
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out = R.prism_attention(q, k, v, causal=True)
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_fully_masked_row_gives_zeros_and_neg_inf_lse():
    q, k, v = _rand_attn(1, 2, 1, 3, 4, 8)
    for fn in (R.prism_attention, pk.prism_attention):
        out, lse = fn(q, k, v, causal=True, q_pos=torch.tensor([0, 5, 9]),
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

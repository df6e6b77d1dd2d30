"""C++ CPU kernels (csrc/) against python_ref computed in fp64 (deeper than
tests/ops/test_attention.py and test_segment_means.py, which cover every backend).

Hypothesis fuzzes odd sizes (Nq = 1, Nk = 1, primes, m = n, m = 1), head
dims 32/64/80/128, random counts, causal with random partition layouts and
unsorted key positions, grouped heads, fully masked rows and the
non-contiguous views Hugging Face passes. Runs under the ASan/UBSan build too
(docs/cpu_kernels.md).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref
from python_ref.layout import device_tensors, plan_layout
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not pk.cpp_variant(), reason="C++ extension not built")


@pytest.fixture(autouse=True)
def _cpp_backend():
    """Every call here runs the C++ kernels (also the default-backend and torch.ops calls)."""
    with pk.use_backend("cpp"):
        yield

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 2, 3, 7, 13, 31, 32, 33, 64, 65, 97, 128, 131]


def _ref_attention(q, k, v, counts, q_pos, k_pos, causal):
    """fp64 reference on the (already rounded) inputs."""
    return python_ref.prism_attention(
        q.double(), k.double(), v.double(), key_counts=counts, causal=causal,
        q_pos=q_pos, k_pos=k_pos, return_lse=True)


def _maybe_strided(t, how):
    """Same values, different memory layout (what HF and slicing produce)."""
    if how == "contiguous":
        return t
    if how == "transposed":  # [B, N, H, d] storage viewed as [B, H, N, d]
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "sliced_d":  # last dim not contiguous: kernel copies as a fallback
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise AssertionError(how)


def _check(q, k, v, counts, q_pos, k_pos, causal, dtype):
    out, lse = pk.prism_attention(q, k, v, key_counts=counts, causal=causal, q_pos=q_pos,
                                  k_pos=k_pos, backend="cpp", return_lse=True)
    ref, ref_lse = _ref_attention(q, k, v, counts, q_pos, k_pos, causal)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype)
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead), "-inf lse on exactly the rows with no visible key"
    assert (out[dead] == 0).all(), "rows with no visible key must be exact zeros"
    lse_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], **lse_tol)


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    Nq = draw(st.sampled_from(SIZES))
    Nk = draw(st.sampled_from(SIZES))
    d = draw(st.sampled_from([32, 64, 80, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans())
    counts_kind = draw(st.sampled_from(["none", "shared", "per_batch"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced_d"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, Hkv, Nq, Nk, d, dtype, causal, counts_kind, layout, seed


@given(attention_case())
def test_attention_fuzz(case):
    B, H, Hkv, Nq, Nk, d, dtype, causal, counts_kind, layout, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    q, k, v = (_maybe_strided(t, layout) for t in (q, k, v))
    counts = {"none": None,
              "shared": torch.randint(1, 40, (Nk,), generator=g),
              "per_batch": torch.randint(1, 40, (B, Nk), generator=g).float()}[counts_kind]
    q_pos = k_pos = None
    if causal:
        # Arbitrary (unsorted) positions, some query rows may see no key at all.
        q_pos = torch.randint(0, 2 * max(Nq, Nk), (B, Nq), generator=g)
        k_pos = torch.randint(0, 2 * max(Nq, Nk), (Nk,), generator=g)
    _check(q, k, v, counts, q_pos, k_pos, causal, dtype)


@settings(max_examples=15)
@given(st.integers(48, 300), st.integers(2, 4), st.integers(1, 8), st.sampled_from([32, 64, 80]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.data())
def test_attention_partition_layouts(N, P, m, d, dtype, data):
    """Causal Prism layouts (Eq. 17): local rows, then means at their last token."""
    m = min(m, N // P)
    plan = plan_layout(N, P, m, causal=True)
    i = data.draw(st.integers(0, P - 1))
    counts, q_pos, k_pos = device_tensors(plan, i)
    H, Hkv = 4, data.draw(st.sampled_from([1, 2, 4]))
    Nq, Nk = len(q_pos), len(k_pos)
    q = torch.randn(1, H, Nq, d).to(dtype)
    k = torch.randn(1, Hkv, Nk, d).to(dtype)
    v = torch.randn(1, Hkv, Nk, d).to(dtype)
    _check(q, k, v, counts, q_pos, k_pos, True, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_many_blocks(causal, dtype):
    """Nq >= 768 and Nk > 512: several query and key blocks, skipped and masked blocks,
    positions shuffled so blocks are not sorted."""
    N, P, i = 2400, 3, 1
    plan = plan_layout(N, P, 37, causal=causal)
    counts, q_pos, k_pos = device_tensors(plan, i)
    perm = torch.randperm(len(k_pos))
    counts, k_pos = counts[perm], k_pos[perm]
    Nq, Nk, d = len(q_pos), len(k_pos), 64
    q = torch.randn(1, 2, Nq, d).to(dtype)
    k = torch.randn(1, 1, Nk, d).to(dtype)
    v = torch.randn(1, 1, Nk, d).to(dtype)
    if causal:
        _check(q, k, v, counts, q_pos, k_pos, True, dtype)
    else:
        _check(q, k, v, counts, None, None, False, dtype)


def test_attention_sorted_causal_skips_match():
    """Plain causal (arange positions), Nq == Nk, long: exercises block skipping."""
    N, d = 1100, 32
    q, k, v = torch.randn(1, 2, N, d), torch.randn(1, 2, N, d), torch.randn(1, 2, N, d)
    _check(q, k, v, None, None, None, True, torch.float32)


def test_fully_masked_rows_are_zero():
    q, k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)
    q_pos = torch.tensor([0, 1, 10, 11, 12])
    k_pos = torch.tensor([10, 11, 12, 13])
    out, lse = pk.prism_attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, return_lse=True)
    assert (out[:, :, :2] == 0).all() and torch.isinf(lse[:, :, :2]).all()
    assert (lse[:, :, :2] < 0).all()
    assert torch.isfinite(lse[:, :, 2:]).all() and (out[:, :, 2:] != 0).any()


def test_lse_merges_partial_results():
    """Two halves of the keys, merged with their lse, give the full attention."""
    q, k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 90, 64), torch.randn(1, 3, 90, 64)
    c = torch.randint(1, 9, (90,))
    full = pk.prism_attention(q, k, v, key_counts=c)
    o1, l1 = pk.prism_attention(q, k[:, :, :50], v[:, :, :50], key_counts=c[:50], return_lse=True)
    o2, l2 = pk.prism_attention(q, k[:, :, 50:], v[:, :, 50:], key_counts=c[50:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    assert_close(merged, full.double(), torch.float32)


def test_stride0_expanded_inputs_and_batch_positions():
    """log_counts / positions expanded over B with stride 0 (what the API passes)."""
    B, Nq, Nk = 3, 17, 23
    q, k, v = torch.randn(B, 2, Nq, 32), torch.randn(B, 2, Nk, 32), torch.randn(B, 2, Nk, 32)
    lc = torch.rand(Nk).add(1).log().expand(B, Nk)
    qp = torch.arange(5, 5 + Nq).expand(B, Nq)
    kp = torch.randint(0, 25, (Nk,)).expand(B, Nk)
    out, lse = torch.ops.prism.attention(q, k, v, lc, qp, kp, 0.3)
    ref, ref_lse = python_ref.attention._masked_softmax_attention(
        q.double(), k.double(), v.double(), lc.double(), qp, kp, 0.3, True)
    assert_close(out, ref, torch.float32)


def test_degenerate_strides():
    """Stride-0 rows (expand over N), size-1 rows with a stride < d, d with
    stride > 1: read correctly (in place or through the copy fallback)."""
    k = torch.randn(1, 2, 1, 32).expand(1, 2, 7, 32)            # row stride 0
    v = torch.randn(1, 2, 7, 32)
    q = torch.randn(1, 2, 32, 1).transpose(2, 3)                 # Nq = 1, row stride 1 < d
    assert q.stride(-2) < q.shape[-1] and k.stride(-2) == 0
    c = torch.arange(1, 8)
    out = pk.prism_attention(q, k, v, key_counts=c)
    ref = python_ref.prism_attention(q.double(), k.double(), v.double(), key_counts=c)
    assert_close(out, ref, torch.float32)
    q2 = torch.randn(1, 2, 3, 32).expand(1, 2, 3, 32)[:, :, [0, 0, 2]]
    q2 = q2.as_strided((1, 2, 3, 32), (192, 96, 8, 1))          # overlapping rows
    out = pk.prism_attention(q2, k, v, key_counts=c)
    ref = python_ref.prism_attention(q2.double(), k.double(), v.double(), key_counts=c)
    assert_close(out, ref, torch.float32)


def test_op_checks_name_argument():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.prism.attention(q, k, k, None, None, None, 1.0)
    k = torch.randn(1, 3, 5, 8)
    with pytest.raises(RuntimeError, match="log_counts must have shape"):
        torch.ops.prism.attention(q, k, k, torch.zeros(1, 4), None, None, 1.0)
    with pytest.raises(RuntimeError, match="q_pos and k_pos must be given together"):
        torch.ops.prism.attention(q, k, k, None, torch.zeros(1, 4, dtype=torch.long), None, 1.0)
    with pytest.raises(RuntimeError, match="num_segments must satisfy"):
        torch.ops.prism.segment_means(torch.randn(3, 4), 4)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.prism.segment_means(torch.ones(3, 4, dtype=torch.int32), 1)


# ---------------------------------------------------------------- segment means

@st.composite
def segment_case(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n = draw(st.sampled_from([1, 2, 5, 13, 64, 97, 200]))
    D = draw(st.sampled_from([1, 3, 16, 33, 64, 130, 768]))
    m = draw(st.sampled_from(["one", "all", "some"]))
    m = {"one": 1, "all": n}.get(m) or draw(st.integers(1, n))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided_d"]))
    return lead, n, D, m, dtype, layout


@given(segment_case())
def test_segment_means_fuzz(case):
    lead, n, D, m, dtype, layout = case
    if layout == "contiguous":
        x = torch.randn(*lead, n, D).to(dtype)
    elif layout == "transposed":
        x = torch.randn(*lead, D, n).to(dtype).transpose(-1, -2)
    else:
        x = torch.randn(*lead, n, 2 * D).to(dtype)[..., ::2]
    means, counts = pk.segment_means(x, m, backend="cpp")
    ref, ref_counts = python_ref.segment_means(x.double(), m)
    assert means.dtype == dtype and means.is_contiguous() and means.shape == ref.shape
    assert torch.equal(counts, ref_counts) and counts.dtype == torch.int64
    assert_close(means, ref, dtype)


def test_segment_means_long_segment_fp32():
    """One mean over many rows: the accumulation stays accurate."""
    x = torch.randn(20000, 8) + 3.0
    means, _ = pk.segment_means(x, 1)
    assert_close(means, x.double().mean(0, keepdim=True), torch.float32)


# ---------------------------------------------------------------- variant selection

def test_loaded_variant_matches_cpu():
    from prism_kernels import _cpp
    name = pk.cpp_variant()
    mod = __import__(f"prism_kernels.{name}", fromlist=["capability"])
    assert name in _cpp._candidates()
    assert mod.capability() == {"_C_avx512": "AVX512", "_C_avx2": "AVX2", "_C_default": "DEFAULT"}[name]


@pytest.mark.parametrize("forced, expect", [("DEFAULT", "_C_default"), ("AVX2", "_C_avx2")])
def test_forced_capability_loads_narrower_build(forced, expect):
    """PRISM_CPU_CAPABILITY caps the variant, e.g. to emulate an older CPU."""
    import importlib.util
    if importlib.util.find_spec(f"prism_kernels.{expect}") is None:
        pytest.skip(f"{expect} not built (PRISM_CPU_VARIANTS)")
    code = ("import torch, prism_kernels as pk; print(pk.cpp_variant()); "
            "q = torch.randn(1, 2, 9, 32); "
            "o = pk.prism_attention(q, q, q, key_counts=torch.arange(1, 10)); "
            "r = pk.prism_attention(q, q, q, key_counts=torch.arange(1, 10), backend='reference'); "
            "print(bool(torch.allclose(o, r, atol=1e-5)))")
    env = dict(os.environ, PRISM_CPU_CAPABILITY=forced)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [expect, "True"]

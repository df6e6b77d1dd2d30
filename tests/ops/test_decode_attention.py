"""The split-K decode path of prism::attention (few queries over a long key
list): C++ (csrc/attention_decode.cpp) and Triton
(prism_kernels/triton_kernels/attention_decode.py), against python_ref in fp64.

Every check also asserts, through the path's call counter, that the split-K
path really ran (or really did not), so a test cannot silently exercise the
general kernel instead. Chunk sizes are forced small so that many chunks, a
short last chunk, chunks with no visible key and the log-sum-exp merge are all
exercised; the automatic choice is tested separately.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref
from op_backends import HAS_TRITON, INTERPRET
from tolerances import assert_close, assert_grad_close

HAS_CPP = bool(pk.cpp_variant())
cpp_only = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
TRITON_OK = HAS_TRITON and (INTERPRET or torch.cuda.is_available())
triton_only = pytest.mark.skipif(not TRITON_OK, reason="needs Triton with a GPU or TRITON_INTERPRET=1")
TDEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ext():
    from prism_kernels import ops
    return ops._ext()


def _ref(q, k, v, lc, qp, kp, scale):
    return python_ref.attention._masked_softmax_attention(
        q.double(), k.double(), v.double(), None if lc is None else lc.double(), qp, kp, scale, True)


def _check_against_ref(out, lse, q, k, v, lc, qp, kp, scale):
    ref, ref_lse = _ref(q.cpu(), k.cpu(), v.cpu(), None if lc is None else lc.cpu(),
                        None if qp is None else qp.cpu(), None if kp is None else kp.cpu(), scale)
    out, lse = out.cpu(), lse.cpu()
    dtype = q.dtype
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype)
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead), "-inf lse on exactly the rows with no visible key"
    assert (lse[dead] < 0).all()
    assert (out[dead] == 0).all(), "rows with no visible key must be exact zeros"
    lse_tol = (dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64
               else dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 or q.device.type == "cpu"
               else dict(atol=1e-3, rtol=1e-3))
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], **lse_tol)


def _inputs(B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, seed, device="cpu",
            layout="contiguous"):
    """Random decode inputs. causal: the queries sit at the end (decode), some keys
    are padding (positions past every query: never visible); masked: batch row 0's
    first query sees no key at all."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, H, Nq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    if layout == "transposed":  # [B, N, H, d] storage, as Hugging Face passes it
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    lc = None
    if counts == "shared":
        lc = torch.randint(1, 40, (Nk,), generator=g).to(acc).log().expand(B, Nk)
    elif counts == "per_batch":
        lc = (torch.rand(B, Nk, generator=g, dtype=acc) * 30 + 1).log()
    qp = kp = None
    if causal:
        # keys: unsorted positions (own rows, then means at their last token);
        # about a tenth of them padding, past every query
        kp = torch.randint(0, Nk + 8, (B, Nk), generator=g)
        pad = torch.rand(B, Nk, generator=g) < 0.1
        kp = torch.where(pad, torch.full_like(kp, 10 ** 9), kp)
        qp = Nk + torch.randint(-Nq - 8, 8, (B, Nq), generator=g)
        if masked:
            qp[0, 0] = -1
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(lc), to(qp), to(kp)


# ---------------------------------------------------------------- C++

def _cpp_run(q, k, v, lc, qp, kp, scale, chunk):
    """The C++ kernel with the decode path forced (chunk > 0), decided (-1) or off (0);
    returns (out, lse, whether the decode path ran)."""
    m = _ext()
    n0 = m.decode_calls()
    out, lse = m.attention_with_chunk(q, k, v, lc, qp, kp, scale, chunk)
    return out, lse, m.decode_calls() - n0 == 1


@st.composite
def decode_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.sampled_from([1, 3, 4]))
    Nq = draw(st.integers(1, 8))
    Nk = draw(st.one_of(st.integers(1, 40), st.integers(41, 3000)))
    d = draw(st.sampled_from([32, 64, 80]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    counts = draw(st.sampled_from(["none", "shared", "per_batch"]))
    causal = draw(st.booleans())
    masked = causal and draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed"]))
    chunk = draw(st.integers(1, max(1, Nk // 2) + 3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, layout, chunk, seed


@cpp_only
@settings(max_examples=40)
@given(decode_case())
def test_cpp_decode_split_matches_reference(case):
    B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, layout, chunk, seed = case
    q, k, v, lc, qp, kp = _inputs(B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, seed,
                                  layout=layout)
    scale = 1.0 / math.sqrt(d)
    out, lse, ran = _cpp_run(q, k, v, lc, qp, kp, scale, chunk)
    assert ran, "the split-K decode path did not run"
    _check_against_ref(out, lse, q, k, v, lc, qp, kp, scale)


@cpp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("H,Hkv", [(9, 3), (12, 12), (8, 2)])
def test_cpp_decode_automatic_choice(dtype, H, Hkv):
    """The op itself takes the decode path for a decode step (Nq = 1, 2048 keys, counts,
    causal with padding), and the general kernel when it is switched off; both exact."""
    q, k, v, lc, qp, kp = _inputs(1, H, Hkv, 1, 2048, 64, dtype, "shared", True, False, seed=H)
    m = _ext()
    assert m.decode_chunk(1, H, Hkv, 1, 2048, torch.get_num_threads()) > 0
    n0 = m.decode_calls()
    out, lse = torch.ops.prism.attention(q, k, v, lc, qp, kp, 0.125, "cpp")
    assert m.decode_calls() == n0 + 1, "prism::attention did not take the decode path"
    _check_against_ref(out, lse, q, k, v, lc, qp, kp, 0.125)
    prev = m.set_decode_enabled(False)
    try:
        out0, lse0 = torch.ops.prism.attention(q, k, v, lc, qp, kp, 0.125, "cpp")
    finally:
        m.set_decode_enabled(prev)
    assert m.decode_calls() == n0 + 1, "switched off, yet the decode path ran"
    _check_against_ref(out0, lse0, q, k, v, lc, qp, kp, 0.125)
    out1, _, ran = _cpp_run(q, k, v, lc, qp, kp, 0.125, 0)   # chunk 0: the general kernel
    assert not ran and torch.equal(out1, out0)


@cpp_only
def test_cpp_decode_chunk_choice():
    m = _ext()
    assert m.decode_chunk(1, 9, 3, 1, 512, 2) == 0          # short key list: general kernel
    assert m.decode_chunk(1, 9, 3, 17, 4096, 2) == 0        # many queries: general kernel
    for threads in (1, 2, 4, 8):
        for B, H, Hkv in [(1, 9, 3), (1, 12, 12), (2, 32, 8)]:
            for Nk in (1024, 1500, 4096, 8192):
                c = m.decode_chunk(B, H, Hkv, 1, Nk, threads)
                assert c >= 256 or c >= Nk, (threads, B, Hkv, Nk, c)
                chunks = -(-Nk // c)
                # enough (b, kv head, chunk) tasks for the threads, when the keys allow
                assert B * Hkv * chunks >= min(threads, Nk // 256 * B * Hkv)
    # 9 query heads / 3 kv heads on 2 threads: an even number of tasks (no 5 + 4 round)
    c = m.decode_chunk(1, 9, 3, 1, 4096, 2)
    assert (3 * -(-4096 // c)) % 2 == 0
    prev = m.set_decode_enabled(False)
    try:
        assert m.decode_chunk(1, 9, 3, 1, 4096, 2) == 0
    finally:
        m.set_decode_enabled(prev)


@cpp_only
def test_cpp_decode_every_key_masked_and_empty_chunks():
    """Chunks where no row sees a key, rows that see none at all, and one key visible
    in the last chunk only: the merge must weight chunks exactly."""
    B, H, Hkv, Nq, Nk, d = 2, 4, 2, 3, 1100, 32
    q, k, v, lc, _, _ = _inputs(B, H, Hkv, Nq, Nk, d, torch.float32, "per_batch", False, False, 5)
    kp = torch.full((B, Nk), 10 ** 6, dtype=torch.int64)
    kp[0, -1] = 5                       # batch 0: only the very last key can be visible
    kp[1, 300:320] = torch.arange(20)   # batch 1: 20 keys inside the second chunk
    qp = torch.tensor([[4, 5, 6], [-1, 10, 100]])
    out, lse, ran = _cpp_run(q, k, v, lc, qp, kp, 0.2, 256)
    assert ran
    _check_against_ref(out, lse, q, k, v, lc, qp, kp, 0.2)
    assert torch.isinf(lse[0, :, 0]).all() and torch.isinf(lse[1, :, 0]).all()
    assert torch.isfinite(lse[0, :, 1:]).all() and torch.isfinite(lse[1, :, 1:]).all()


@cpp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_decode_backward(dtype):
    """Gradients through prism_attention when the forward ran the decode path (the
    backward recomputes from the forward's out and lse)."""
    B, H, Hkv, Nq, Nk, d = 1, 6, 2, 2, 1500, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g, dtype=dtype)
    counts = torch.rand(Nk, generator=g, dtype=dtype) * 9 + 1
    k_pos = torch.randint(0, Nk, (Nk,), generator=g)
    q_pos = torch.tensor([Nk // 2, Nk])
    d_out = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    d_lse = torch.randn(B, H, Nq, generator=g, dtype=torch.float64)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v, counts)]
        o, lse = fn(*leaves[:3], key_counts=leaves[3], causal=True, q_pos=q_pos, k_pos=k_pos,
                    return_lse=True)
        loss = (o.double() * d_out).sum() + (lse.double() * d_lse).sum()
        return o, torch.autograd.grad(loss, leaves)

    m = _ext()
    n0 = m.decode_calls()
    out, grads = run(lambda *a, **kw: pk.prism_attention(*a, backend="cpp", **kw), dtype)
    assert m.decode_calls() > n0, "the forward did not take the decode path"
    ref, ref_grads = run(python_ref.prism_attention, torch.float64)
    assert_close(out, ref, dtype)
    for gr, rg in zip(grads, ref_grads):
        assert_grad_close(gr, rg, dtype)


# ---------------------------------------------------------------- Triton

def _triton_run(q, k, v, lc, qp, kp, scale, **force):
    from prism_kernels.triton_kernels import attention_decode as ad
    from prism_kernels.triton_kernels import attention_triton, decode_split
    n0 = ad.CALLS["split"]
    with decode_split(**force):
        out, lse = attention_triton(q, k, v, lc, qp, kp, scale)
    return out, lse, ad.CALLS["split"] - n0 == 1


@st.composite
def triton_case(draw):
    # tiny: every program-iteration costs milliseconds under the interpreter
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 3, 4]))
    Nq = draw(st.integers(1, 4))
    Nk = draw(st.integers(1, 70))
    d = draw(st.sampled_from([16, 32, 40]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    counts = draw(st.sampled_from(["none", "shared", "per_batch"]))
    causal = draw(st.booleans())
    masked = causal and draw(st.booleans())
    chunk = draw(st.sampled_from([5, 16, 24, 64]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, chunk, seed


@triton_only
@settings(max_examples=8)
@given(triton_case())
def test_triton_decode_split_matches_reference(case):
    B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, chunk, seed = case
    q, k, v, lc, qp, kp = _inputs(B, H, Hkv, Nq, Nk, d, dtype, counts, causal, masked, seed,
                                  device=TDEV)
    if lc is not None:
        lc = lc.float()
    scale = 1.0 / math.sqrt(d)
    out, lse, ran = _triton_run(q, k, v, lc, qp, kp, scale, chunk=chunk)
    assert ran, "the split-K decode path did not run"
    _check_against_ref(out, lse, q, k, v, lc, qp, kp, scale)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_masked_rows_and_gqa(dtype):
    """GQA 3:1, a row that sees no key, chunks where nobody sees a key (padding)."""
    B, H, Hkv, Nq, Nk, d = 2, 3, 1, 2, 48, 16
    q, k, v, lc, _, _ = _inputs(B, H, Hkv, Nq, Nk, d, dtype, "per_batch", False, False, 7,
                                device=TDEV)
    kp = torch.full((B, Nk), 10 ** 6, dtype=torch.int64)
    kp[0, -1] = 3
    kp[1, 20:28] = torch.arange(8)
    qp = torch.tensor([[2, 3], [-1, 5]])
    kp, qp = kp.to(TDEV), qp.to(TDEV)
    out, lse, ran = _triton_run(q, k, v, lc, qp, kp, 0.25, chunk=16)
    assert ran
    _check_against_ref(out, lse, q, k, v, lc, qp, kp, 0.25)
    assert torch.isinf(lse[0, :, 0]).all() and torch.isinf(lse[1, :, 0]).all()


@triton_only
def test_triton_decode_choice_and_switch():
    from prism_kernels.triton_kernels import attention_decode as ad
    from prism_kernels.triton_kernels import decode_split
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert ad.decode_chunk(1, 9, 3, 1, 4096, 64, dev) > 0
    assert ad.decode_chunk(1, 9, 3, 1, 100, 64, dev) == 0       # short key list
    assert ad.decode_chunk(1, 9, 3, 32, 4096, 64, dev) == 0     # many queries
    assert ad.decode_chunk(1, 9, 3, 1, 4096, 256, dev) == 0     # wide heads
    with decode_split(enabled=False):
        assert ad.decode_chunk(1, 9, 3, 1, 4096, 64, dev) == 0
    with decode_split(chunk=7):
        assert ad.decode_chunk(1, 9, 3, 1, 20, 64, dev) == 7
    # off: the general kernel runs, and agrees
    q, k, v, lc, qp, kp = _inputs(1, 4, 2, 1, 40, 16, torch.float32, "shared", True, False, 1,
                                  device=TDEV)
    lc = lc.float()
    out0, lse0, ran0 = _triton_run(q, k, v, lc, qp, kp, 0.25, enabled=False)
    out1, lse1, ran1 = _triton_run(q, k, v, lc, qp, kp, 0.25, chunk=16)
    assert not ran0 and ran1
    assert_close(out1, out0.double())


@triton_only
def test_triton_decode_through_the_op_with_backward():
    """prism_attention(backend="triton") on the split path: forward and gradients."""
    from prism_kernels.triton_kernels import decode_split
    from prism_kernels.triton_kernels import attention_decode as ad
    B, H, Hkv, Nq, Nk, d = 1, 4, 2, 2, 40, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(*s, generator=g) for s in [(B, H, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d)])
    counts = torch.rand(Nk, generator=g) * 5 + 1
    d_out = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)

    def run(fn, dev, dtype):
        leaves = [t.to(dev, dtype).requires_grad_(True) for t in (q, k, v, counts)]
        o = fn(*leaves[:3], key_counts=leaves[3])
        return o, torch.autograd.grad((o.double() * d_out.to(dev)).sum(), leaves)

    n0 = ad.CALLS["split"]
    with decode_split(chunk=16):
        out, grads = run(lambda *a, **kw: pk.prism_attention(*a, backend="triton", **kw),
                         TDEV, torch.float32)
    assert ad.CALLS["split"] > n0
    ref, ref_grads = run(python_ref.prism_attention, "cpu", torch.float64)
    assert_close(out.cpu(), ref, torch.float32)
    for gr, rg in zip(grads, ref_grads):
        assert_grad_close(gr.cpu(), rg, torch.float32)


@triton_only
@pytest.mark.skipif(not INTERPRET, reason="the --interpret cases of gpu_check.py are CPU-only")
def test_gpu_check_decode_cases_pass_and_catch_a_missed_split():
    """benchmarks/gpu_check.py's decode cases pass, and fail when the split-K path
    does not run (an impl that switches it off) or the output is off."""
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(root, "benchmarks", "gpu_check.py"))
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    from prism_kernels.triton_kernels import attention_triton, decode_split
    cpu = torch.device("cpu")
    for case in gc.INTERPRET_DECODE_CASES:
        r = gc.check_attention_case(attention_triton, case, torch.float32, cpu, seed=4)
        assert r["ok"], r

    def general_only(*a):
        with decode_split(enabled=False):
            return attention_triton(*a)

    def off_by_2_percent(*a):
        out, lse = attention_triton(*a)
        return out * 1.02, lse

    case = gc.INTERPRET_DECODE_CASES[0]
    r = gc.check_attention_case(general_only, case, torch.float32, cpu, seed=4)
    assert not r["ok"] and "did not run" in r["reason"]
    r = gc.check_attention_case(off_by_2_percent, case, torch.float32, cpu, seed=4)
    assert not r["ok"]

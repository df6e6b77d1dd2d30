"""Triton kernels (deeper than tests/ops/test_attention.py, test_segment_means.py) against
python_ref: under the interpreter on CPU (CI), on the GPU when there is one.

Small shapes only (the interpreter costs milliseconds per program-iteration).
bf16 is skipped under the interpreter, which computes it wrongly; it is covered
by benchmarks/gpu_check.py and by the GPU-only tests below.
"""
import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref
from prism_kernels.triton_kernels import attention_triton, segment_means_triton
from python_ref.attention import _masked_softmax_attention
from tolerances import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
BF16_SKIP = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter computes bf16 wrongly; "
                               "bf16 is checked on the GPU (benchmarks/gpu_check.py)")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_SKIP)]


def _ref(q, k, v, lc, qp, kp, scale):
    """fp32 reference from the same rounded inputs, output rounded to q's dtype."""
    out, lse = _masked_softmax_attention(q.float(), k.float(), v.float(), lc, qp, kp, scale, True)
    return out.to(q.dtype), lse


def _check(q, k, v, lc=None, qp=None, kp=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = attention_triton(q, k, v, lc, qp, kp, scale)
    ref, ref_lse = _ref(q, k, v, lc, qp, kp, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close(out, ref)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert_close(lse[fin], ref_lse[fin], dtype=torch.float32,
                 **({} if q.dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)))
    return out, lse


def _device_inputs(N, P, m, i, B, H, Hkv, d, dtype, causal=True, hf=False):
    plan = python_ref.plan_layout(N, P, m, causal=causal)
    counts, qp, kp = python_ref.device_tensors(plan, i, device=DEV)
    Nq, Nk = qp.numel(), kp.numel()

    def rnd(h, n):
        if hf:  # transposed view of [B, n, h, d], as Hugging Face passes it
            return torch.randn(B, n, h, d, device=DEV).to(dtype).transpose(1, 2)
        return torch.randn(B, h, n, d, device=DEV).to(dtype)

    q, k, v = rnd(H, Nq), rnd(Hkv, Nk), rnd(Hkv, Nk)
    lc = counts.float().log()[None].expand(B, Nk)  # stride-0 over batch, as the API passes it
    if not causal:
        return q, k, v, lc, None, None
    return q, k, v, lc, qp[None].expand(B, Nq), kp[None].expand(B, Nk)


# ---------------------------------------------------------------- segment means

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", [((37, 20), 5), ((2, 3, 19, 33), 19), ((2, 50, 16), 1),
                                     ((3, 40, 70), 6)])
def test_segment_means_matches_reference(dtype, shape, m):
    x = torch.randn(*shape, device=DEV).to(dtype)
    means, counts = segment_means_triton(x, m)
    ref, ref_counts = python_ref.segment_means(x, m)
    assert means.shape == ref.shape and means.dtype == dtype
    assert counts.dtype == torch.int64 and counts.device == x.device
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    assert_close(means, ref)


def test_segment_means_strided_input():
    base = torch.randn(2, 24, 41, device=DEV)      # [.., D, n] storage
    x = base.transpose(-1, -2)                      # [2, 41, 24], non-contiguous
    means, counts = segment_means_triton(x, 4)
    ref, _ = python_ref.segment_means(x, 4)
    assert_close(means, ref)
    assert counts.tolist() == [11, 10, 10, 10]


def test_segment_means_public_api_and_fp64_error():
    x = torch.randn(2, 30, 16, device=DEV)
    means, _ = pk.segment_means(x, 7, backend="triton")
    assert_close(means, python_ref.segment_means(x, 7)[0])
    with pytest.raises(ValueError, match="float64"):
        segment_means_triton(x.double(), 3)


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_device_layout_grouped_heads(dtype):
    # device 2 of 3: its own rows then means of partitions 0 and 1 (positions not sorted);
    # 4 query heads over 2 kv heads; HF-style transposed strides.
    q, k, v, lc, qp, kp = _device_inputs(50, 3, 4, 2, B=2, H=4, Hkv=2, d=24, dtype=dtype, hf=True)
    assert not q.is_contiguous()
    _check(q, k, v, lc, qp, kp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncausal_odd_sizes_counts_d80(dtype):
    # Nq, Nk not multiples of the block; d = 80 padded to BLOCK_D = 128
    q = torch.randn(1, 2, 19, 80, device=DEV).to(dtype)
    k = torch.randn(1, 1, 23, 80, device=DEV).to(dtype)
    v = torch.randn(1, 1, 23, 80, device=DEV).to(dtype)
    lc = torch.randint(1, 9, (1, 23), device=DEV).float().log()
    _check(q, k, v, lc, scale=0.37)


def test_no_counts_noncausal_fp32():
    q = torch.randn(2, 3, 17, 32, device=DEV)
    k = torch.randn(2, 3, 33, 32, device=DEV)
    v = torch.randn(2, 3, 33, 32, device=DEV)
    _check(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_are_zero_with_neg_inf_lse(dtype):
    q, k, v, lc, qp, kp = _device_inputs(40, 2, 3, 1, B=2, H=2, Hkv=1, d=16, dtype=dtype)
    qp = qp.clone()
    dead = [0, 5, 19]                        # batch row 1: these queries precede every key
    qp[1, dead] = kp.min() - 1
    out, lse = _check(q, k, v, lc, qp, kp)
    assert torch.all(out[1, :, dead] == 0)
    assert torch.all(lse[1, :, dead] == float("-inf"))
    assert torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("per_batch_pos,per_batch_counts", [(True, True), (True, False), (False, True)])
def test_causal_positions_and_counts_per_batch_or_shared_fp32(per_batch_pos, per_batch_counts):
    # random, non-monotone positions; each of positions / counts either differs per
    # batch row or is one row expanded with stride 0 (the kernel sorts keys once then)
    B, H, Nq, Nk, d = 2, 2, 21, 30, 16
    q = torch.randn(B, H, Nq, d, device=DEV)
    k = torch.randn(B, H, Nk, d, device=DEV)
    v = torch.randn(B, H, Nk, d, device=DEV)
    if per_batch_pos:
        qp = torch.stack([torch.randperm(40, device=DEV)[:Nq] for _ in range(B)])
        kp = torch.stack([torch.randperm(40, device=DEV)[:Nk] for _ in range(B)])
    else:
        qp = torch.randperm(40, device=DEV)[:Nq][None].expand(B, Nq)
        kp = torch.randperm(40, device=DEV)[:Nk][None].expand(B, Nk)
    if per_batch_counts:
        lc = torch.randint(1, 5, (B, Nk), device=DEV).float().log()
    else:
        lc = torch.randint(1, 5, (Nk,), device=DEV).float().log()[None].expand(B, Nk)
    _check(q, k, v, lc, qp, kp)


def test_masked_key_blocks_are_skipped():
    # The first 128 keys sit after every query (in storage order they come first, and
    # span whole key blocks for any BLOCK_N). No query sees them, so the kernel must
    # never read them: NaN stored there must not reach the output (a kernel that
    # loaded and merely masked them would give 0 * NaN = NaN).
    B, H, Nq, d = 1, 2, 20, 16
    Nk = 128 + 20
    q = torch.randn(B, H, Nq, d, device=DEV)
    k = torch.randn(B, H, Nk, d, device=DEV)
    v = torch.randn(B, H, Nk, d, device=DEV)
    k[:, :, :128] = float("nan")
    v[:, :, :128] = float("nan")
    qp = torch.arange(100, 100 + Nq, device=DEV)[None]
    kp = torch.cat([torch.arange(1000, 1128, device=DEV), torch.arange(90, 110, device=DEV)])[None]
    out, lse = attention_triton(q, k, v, None, qp, kp, 0.25)
    ref, ref_lse = _ref(q, k[:, :, 128:], v[:, :, 128:], None, qp, kp[:, 128:], 0.25)
    assert_close(out, ref)
    assert_close(lse, ref_lse)


def test_public_api_triton_backend_matches_duplicated_attention():
    plan = python_ref.plan_layout(30, 3, 2, causal=True)
    counts, qp, kp = python_ref.device_tensors(plan, 1, device=DEV)
    q = torch.randn(1, 2, qp.numel(), 16, device=DEV)
    k = torch.randn(1, 1, kp.numel(), 16, device=DEV)
    v = torch.randn(1, 1, kp.numel(), 16, device=DEV)
    out, lse = pk.prism_attention(q, k, v, key_counts=counts, causal=True, q_pos=qp, k_pos=kp,
                                  backend="triton", return_lse=True)
    dup = python_ref.duplicated_attention(q, k, v, counts, causal=True, q_pos=qp, k_pos=kp)
    assert_close(out, dup)


def test_fp64_raises_clear_error():
    q = torch.randn(1, 1, 4, 16, device=DEV, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        attention_triton(q, q, q, None, None, None, 0.25)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(Nq=st.integers(1, 40), Nk=st.integers(1, 40), group=st.sampled_from([1, 2]),
       d=st.sampled_from([16, 40]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_random_shapes_fp32(Nq, Nk, group, d, causal, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    Hkv = 1
    q = torch.randn(1, Hkv * group, Nq, d, generator=g, device=DEV)
    k = torch.randn(1, Hkv, Nk, d, generator=g, device=DEV)
    v = torch.randn(1, Hkv, Nk, d, generator=g, device=DEV)
    lc = torch.randint(1, 6, (1, Nk), generator=g, device=DEV).float().log()
    qp = kp = None
    if causal:
        qp = torch.randint(0, 50, (1, Nq), generator=g, device=DEV)
        kp = torch.randint(0, 50, (1, Nk), generator=g, device=DEV)
    _check(q, k, v, lc, qp, kp)


# ---------------------------------------------------------------- the GPU script

def _load_gpu_check():
    path = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not INTERPRET, reason="the --interpret path of gpu_check.py is CPU-only")
def test_gpu_check_interpret_checks_pass():
    gc = _load_gpu_check()
    rows = gc.run_checks(torch.device("cpu"), [torch.float32, torch.float16],
                         gc.INTERPRET_ATTN_CASES, gc.INTERPRET_SEG_CASES, seed=1, log=lambda s: None)
    assert len(rows) == 2 * (len(gc.INTERPRET_ATTN_CASES) + len(gc.INTERPRET_SEG_CASES))
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert gc.main(["--interpret", "--seed", "2"]) == 0


def test_gpu_check_catches_broken_kernels():
    gc = _load_gpu_check()
    dev = torch.device("cpu") if INTERPRET else DEV

    def nan_one(q, k, v, lc, qp, kp, scale):
        out, lse = attention_triton(q, k, v, lc, qp, kp, scale)
        out = out.clone()
        out[0, 0, -1, 0] = float("nan")
        return out, lse

    def no_counts(q, k, v, lc, qp, kp, scale):           # ignores the log-count bias
        return attention_triton(q, k, v, None, qp, kp, scale)

    def bad_seg(x, m):
        means, counts = segment_means_triton(x, m)
        return means * 1.01, counts

    case = gc.INTERPRET_ATTN_CASES[0]
    for impl in (nan_one, no_counts):
        r = gc.check_attention_case(impl, case, torch.float32, dev, seed=3)
        assert not r["ok"], impl.__name__
    r = gc.check_segment_case(bad_seg, gc.INTERPRET_SEG_CASES[0], torch.float32, dev, seed=3)
    assert not r["ok"]


@pytest.mark.gpu  # bf16 is wrong under the interpreter
def test_bf16_on_gpu():
    q, k, v, lc, qp, kp = _device_inputs(300, 3, 7, 2, B=2, H=4, Hkv=2, d=64, dtype=torch.bfloat16)
    _check(q, k, v, lc, qp, kp)


def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter never compiles: build one causal bf16 attention variant and the
    segment-means kernel down to a cubin for sm_90 (no GPU needed, nothing runs)."""
    import subprocess
    import sys
    triton_bin = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin),
                              "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(triton_bin):
        pytest.skip("this Triton install has no bundled ptxas")
    root = ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, no cached cubin
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "f = gpu_check.compile_only([('bf16', 128, True, True, 128, 64, 8, 3)], log=lambda s: None); "
            "print(f); sys.exit(1 if f else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

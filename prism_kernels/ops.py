"""The `prism` torch.library ops: schemas, fake (meta) kernels and the one
dispatch point to the backends.

Three ops, in the kernel form of the arguments (prism_kernels.checks turns the
user-facing arguments into it):

  prism::segment_means(Tensor x, int num_segments, str backend="") -> (Tensor means, Tensor counts)
  prism::attention(Tensor q, Tensor k, Tensor v, Tensor? log_counts, Tensor? q_pos,
                   Tensor? k_pos, float scale, str backend="") -> (Tensor out, Tensor lse)
  prism::matched_rows(Tensor q0, Tensor k, Tensor v, Tensor seg_of, int num_segments,
                      float scale, str backend="") -> (Tensor km, Tensor vm, Tensor bias)

log_counts is fp32 [B, Nk] (fp64 for fp64 inputs; often a stride-0 expand over
B), positions are int64 [B, Nq] / [B, Nk] and present only for causal
attention, lse is the natural-log log-sum-exp [B, H, Nq] (fp32; fp64 for fp64
inputs), -inf on rows with no visible key. matched_rows (the rows a device sends
under count_bias "matched" / "matched_cls", built in every layer): q0 [B, Hkv, d]
fp32 (fp64), k / v [B, n, Hkv*d], seg_of int64 [B, n] -> km / vm [B, m, Hkv*d] in k's
dtype and bias [B, m, Hkv] fp32 (fp64); it has no autograd formula, so callers that
differentiate use torch_backend.matched_rows (hf/matched_summary.py decides).

Backends (BACKENDS):
  cpp     the C++ kernels (csrc/, loaded by prism_kernels._cpp); CPU tensors
  triton  the Triton kernels (prism_kernels.triton_kernels); CUDA tensors, or
          CPU tensors under TRITON_INTERPRET=1 (set before the first import);
          matched_rows has no Triton kernel: it runs the torch code there
  torch   plain PyTorch (prism_kernels.torch_backend); any device
  auto    cpp for CPU tensors (torch when the extension is not built),
          triton for CUDA tensors (torch when Triton is not installed)

Few queries over a long key list (decode steps) take a split-K path inside the
cpp and triton backends (csrc/attention_decode.cpp, triton_kernels/
attention_decode.py); each backend decides that itself, in one function
(decode_chunk), so nothing here changes with it.

Which backend runs is decided when the op runs, by its `backend` argument, or,
when that is "" (the default), by the innermost `use_backend(...)` context
(a contextvar; "auto" outside any). The registered CPU and CUDA
implementations below are small Python functions that read it and call the
kernel; autograd (prism_kernels/autograd.py) and torch.compile see only the
op, so they apply to every backend alike.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from . import _cpp
from . import torch_backend

BACKENDS = ("auto", "cpp", "triton", "torch")

_lib = torch.library.Library("prism", "DEF")
_lib.define('segment_means(Tensor x, int num_segments, str backend="") -> (Tensor, Tensor)')
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? log_counts, Tensor? q_pos, "
    'Tensor? k_pos, float scale, str backend="") -> (Tensor, Tensor)'
)
_lib.define('matched_rows(Tensor q0, Tensor k, Tensor v, Tensor seg_of, int num_segments, float scale, '
            'str backend="") -> (Tensor, Tensor, Tensor)')

# ---------------------------------------------------------------- backend selection

_selected: contextvars.ContextVar[str] = contextvars.ContextVar("prism_backend", default="auto")


def check_backend_name(backend) -> str:
    """`backend` itself; ValueError if it is not one of BACKENDS."""
    if backend in BACKENDS:
        return backend
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@contextlib.contextmanager
def use_backend(backend: str):
    """Run the prism ops in this block (this thread / task) on `backend`.

        with prism_kernels.use_backend("torch"):
            out = prism_kernels.prism_attention(q, k, v, key_counts=c)

    The choice is read when an op runs, so with torch.compile wrap the call of
    the compiled function (Dynamo cannot trace into this context manager); an
    explicit backend= argument of an api function wins over it.
    """
    token = _selected.set(check_backend_name(backend))
    try:
        yield
    finally:
        _selected.reset(token)


def selected_backend() -> str:
    """The backend chosen by the innermost use_backend() ("auto" outside any)."""
    return _selected.get()


_UNSET = object()
_CPP = _UNSET         # the C++ extension module (None when unavailable), loaded on first use


def _ext():
    """The C++ extension, loaded (or compiled into the cache) on the first CPU op call,
    so that importing the package, e.g. for `prism --help`, never waits on a compiler."""
    global _CPP
    if _CPP is _UNSET:
        _CPP = _cpp.module()
    return _CPP
_triton = None        # prism_kernels.triton_kernels once imported; False when unavailable


def _triton_kernels():
    global _triton
    if _triton is None:
        try:
            from . import triton_kernels
            _triton = triton_kernels
        except ImportError:
            _triton = False
    return _triton


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device` ("cpp", "triton" or "torch").

    Raises ValueError for a combination that cannot run (cpp on CUDA, Triton on
    CPU without the interpreter) and RuntimeError for a backend not installed.
    """
    backend = check_backend_name(backend or _selected.get())
    cpu = device.type == "cpu"
    if backend == "auto":
        if cpu:
            return "cpp" if _ext() is not None else "torch"
        return "triton" if device.type == "cuda" and _triton_kernels() else "torch"
    if backend == "cpp":
        if not cpu:
            raise ValueError(f"backend='cpp' needs CPU tensors, got tensors on {device}")
        if _ext() is None:
            raise RuntimeError(
                "backend='cpp' needs the C++ extension, which is not built; run "
                "`python -m prism_kernels.build` to build it and see why it failed (or use backend='auto')")
    elif backend == "triton":
        if cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import; "
                "use CUDA tensors or another backend")
        if not _triton_kernels():
            raise RuntimeError("backend='triton' needs Triton, which is not installed "
                               "(pip install triton)")
    return backend


# ---------------------------------------------------------------- fake kernels

def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("prism::segment_means")
def _segment_means_fake(x, num_segments, backend=""):
    shape = list(x.shape)
    shape[-2] = num_segments
    return x.new_empty(shape), torch.empty(num_segments, dtype=torch.int64, device=x.device)


@torch.library.register_fake("prism::attention")
def _attention_fake(q, k, v, log_counts, q_pos, k_pos, scale, backend=""):
    B, H, Nq, d = q.shape
    return q.new_empty(B, H, Nq, d), torch.empty(B, H, Nq, dtype=lse_dtype(q.dtype), device=q.device)


@torch.library.register_fake("prism::matched_rows")
def _matched_rows_fake(q0, k, v, seg_of, num_segments, scale, backend=""):
    B, F = k.shape[0], k.shape[2]
    return (k.new_empty(B, num_segments, F), k.new_empty(B, num_segments, F),
            k.new_empty(B, num_segments, q0.shape[1], dtype=lse_dtype(k.dtype)))


# ---------------------------------------------------------------- implementations

def _segment_means_impl(x, num_segments, backend=""):
    if _ext() is not None and not backend and x.device.type == "cpu" and _selected.get() == "auto":
        return _CPP.segment_means(x, num_segments)  # the common case, kept short
    name = resolve(backend, x.device)
    if name == "cpp":
        return _CPP.segment_means(x, num_segments)
    if name == "triton":
        return _triton_kernels().segment_means_triton(x, num_segments)
    return torch_backend.segment_means(x, num_segments)


def _attention_impl(q, k, v, log_counts, q_pos, k_pos, scale, backend=""):
    if _ext() is not None and not backend and q.device.type == "cpu" and _selected.get() == "auto":
        return _CPP.attention(q, k, v, log_counts, q_pos, k_pos, scale)  # the common case
    name = resolve(backend, q.device)
    if name == "cpp":
        return _CPP.attention(q, k, v, log_counts, q_pos, k_pos, scale)
    if name == "triton":
        return _triton_kernels().attention_triton(q, k, v, log_counts, q_pos, k_pos, scale)
    return torch_backend.attention(q, k, v, log_counts, q_pos, k_pos, scale)


def _matched_rows_impl(q0, k, v, seg_of, num_segments, scale, backend=""):
    name = resolve(backend, k.device)
    # (an extension built from older sources lacks the kernel: the torch code then runs)
    if name == "cpp" and hasattr(_CPP, "matched_rows"):
        return _CPP.matched_rows(q0, k, v, seg_of, num_segments, scale)
    if name == "cpp" and backend == "cpp":
        raise RuntimeError("backend='cpp': the built C++ extension predates prism::matched_rows; "
                           "rebuild it with `python -m prism_kernels.build`")
    return torch_backend.matched_rows(q0, k, v, seg_of, num_segments, scale)   # torch (and triton)


for _key in ("CPU", "CUDA"):
    _lib.impl("segment_means", _segment_means_impl, _key)
    _lib.impl("attention", _attention_impl, _key)
    _lib.impl("matched_rows", _matched_rows_impl, _key)

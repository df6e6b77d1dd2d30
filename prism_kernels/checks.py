"""Argument checks of the public functions (prism_kernels.api), shared by every backend.

They run once per call, before the op is dispatched to a backend. Each check
names the argument and the rule it breaks, so a user never has to decode a
shape error from deep inside a kernel. `normalize_attention_args`
also turns the user-facing arguments into the one form every kernel takes:
log-counts [B, Nk] fp32 (or None), positions [B, Nq] / [B, Nk] int64 (or None
when not causal) and a float scale.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def check_tensor(name: str, t, ndim: Optional[int] = None, min_ndim: Optional[int] = None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor):
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )


def check_segment_means_args(x, num_segments):
    check_tensor("x", x, min_ndim=2)
    check_float("x", x)
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral):
        raise ValueError(f"num_segments must be an integer, got {num_segments!r}")
    n = x.shape[-2]
    if not 1 <= num_segments <= n:
        raise ValueError(
            f"num_segments must satisfy 1 <= num_segments <= n (n = x.shape[-2] = {n}), "
            f"got {num_segments}"
        )


def _batch_vector(name: str, t, B: int, N: int, n_name: str, device) -> torch.Tensor:
    """Accept [N] or [B, N]; return a [B, N] view (stride 0 over batch for [N])."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [{n_name}] or [B, {n_name}]")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {t.device}")
    if t.dim() == 1 and t.shape[0] == N:
        return t.expand(B, N)
    if t.dim() == 2 and tuple(t.shape) == (B, N):
        return t
    raise ValueError(
        f"{name} must have shape [{n_name}] = [{N}] or [B, {n_name}] = [{B}, {N}], "
        f"got {tuple(t.shape)}"
    )


def _check_counts(counts: torch.Tensor) -> None:
    """Every count >= 1 and finite, with one reduction on the fast path (this
    runs on every call, so it must cost microseconds, not tens of them)."""
    if counts.is_floating_point():
        ok = bool(((counts >= 1) & (counts < math.inf)).all())   # NaN fails both
        if ok:
            return
        if not bool(torch.isfinite(counts).all()):
            raise ValueError("key_counts must be finite (no NaN or inf)")
    elif bool((counts >= 1).all()):
        return
    raise ValueError(
        f"key_counts must be >= 1 everywhere (each key stands for at least one token), "
        f"got min {counts.min().item()}")


def normalize_attention_args(
    q, k, v, key_counts=None, causal=False, q_pos=None, k_pos=None, scale=None
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], float]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, d = q.shape
    Bk, Hkv, Nk, dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must share the batch size B (dim 0), got {B}, {Bk}, {v.shape[0]}")
    if tuple(v.shape[:3]) != (Bk, Hkv, Nk):
        raise ValueError(
            f"k and v must share [B, Hkv, Nk], got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if dk != d or v.shape[3] != d:
        raise ValueError(
            f"q, k and v must share the head dimension d (dim 3), got {d}, {dk}, {v.shape[3]}"
        )
    if H % Hkv != 0:
        raise ValueError(
            f"the number of query heads H must be a multiple of the key/value heads Hkv "
            f"(grouped-query attention), got H={H}, Hkv={Hkv}"
        )

    log_counts = None
    if key_counts is not None:
        kc = _batch_vector("key_counts", key_counts, B, Nk, "Nk", q.device)
        if kc.dtype == torch.bool or kc.is_complex():
            raise ValueError(f"key_counts must be an integer or float tensor, got {kc.dtype}")
        if not _is_compiling():
            _check_counts(key_counts)
        # log of the given [Nk] / [B, Nk] tensor, then the stride-0 expand: the
        # kernels read a shared [Nk] row once, and no [B, Nk] copy is made
        lc = key_counts.to(torch.float64 if q.dtype == torch.float64 else torch.float32).log()
        log_counts = lc if lc.dim() == 2 else lc.expand(B, Nk)

    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if causal:
        if Nq != Nk and (q_pos is None or k_pos is None):
            raise ValueError(
                f"causal attention with Nq != Nk (Nq={Nq}, Nk={Nk}) needs both q_pos and "
                f"k_pos (global positions); the arange default only applies when Nq == Nk"
            )
        if q_pos is None:
            q_pos = torch.arange(Nq, device=q.device)
        if k_pos is None:
            k_pos = torch.arange(Nk, device=q.device)
        q_pos = _batch_vector("q_pos", q_pos, B, Nq, "Nq", q.device)
        k_pos = _batch_vector("k_pos", k_pos, B, Nk, "Nk", q.device)
        for name, t in (("q_pos", q_pos), ("k_pos", k_pos)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor (global positions), got {t.dtype}")
        q_pos = q_pos.to(torch.int64)
        k_pos = k_pos.to(torch.int64)
    elif q_pos is not None or k_pos is not None:
        raise ValueError("q_pos and k_pos are only used with causal=True; pass causal=True or drop them")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return log_counts, q_pos, k_pos, float(scale)

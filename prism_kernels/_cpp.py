"""Loads the C++ CPU kernels, picking the build for this CPU's best ISA.

Where a variant comes from, in order:
1. a module built at install time, prism_kernels._C_<variant> (setup.py builds
   the native variant when torch is importable in the build environment, or
   every variant with PRISM_CPU_VARIANTS=all for a portable wheel); the widest
   one the CPU supports is imported, so a wheel never executes an illegal
   instruction;
2. else the native variant compiled on first use into a cache directory
   (prism_kernels/_build.py; `python -m prism_kernels.build` does it ahead of
   time). PRISM_SKIP_CPP=1 turns this compile off.

When neither gives a module, the ops' CPU kernels are the PyTorch fallback
(prism_kernels/ops.py). The extensions register nothing with torch: each is a
plain module with `attention(...)` and `segment_means(...)`, which the CPU
implementation of the `prism` ops calls when the selected backend is "cpp".
One variant is loaded per process. PRISM_DISABLE_CPP=1 loads none.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

_loaded = None  # name of the loaded variant, or "" when none could load
_module = None  # the loaded extension module (None when none is built)
_attempted = False  # whether this process tried to compile one
_error = ""  # why the compile on first use gave no module (empty when it was not needed)
_VARIANTS = {"AVX512": ["_C_avx512", "_C_avx2", "_C_default"],
             "AVX2": ["_C_avx2", "_C_default"]}


def _candidates():
    forced = os.environ.get("PRISM_CPU_CAPABILITY", "").upper()
    cap = forced or torch.backends.cpu.get_cpu_capability()
    return _VARIANTS.get(cap, ["_C_default"])


def _compile(name: str) -> str:
    """Compile (or reuse from the cache) variant `name`; '' when that fails."""
    global _attempted, _error
    from . import _build
    try:
        _attempted = True
        _build.jit_build(name[len("_C_"):])
    except _build.EarlierBuildFailed as e:
        _attempted = False
        _error = str(e)
        warnings.warn(
            f"prism_kernels: the C++ CPU kernels are not available ({_error}); CPU tensors use "
            "the PyTorch fallback. `python -m prism_kernels.build` retries the build.",
            RuntimeWarning, stacklevel=2)
        return ""
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error...
        _error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        warnings.warn(
            f"prism_kernels: the C++ CPU kernels are not available ({_error}); CPU tensors use "
            "the PyTorch fallback. Run `python -m prism_kernels.build` to retry and see the "
            "compiler output, or set PRISM_SKIP_CPP=1 to skip the compile.",
            RuntimeWarning, stacklevel=2)
        return ""
    return name


def load() -> bool:
    """Import the best extension variant once; False when none is built."""
    global _loaded, _module
    if _loaded is None:
        _loaded = ""
        if os.environ.get("PRISM_DISABLE_CPP") != "1":
            candidates = _candidates()
            for name in candidates:
                try:
                    _module = importlib.import_module(f"prism_kernels.{name}")
                except ImportError:
                    continue
                _loaded = name
                break
            if not _loaded and os.environ.get("PRISM_SKIP_CPP") != "1":
                _loaded = _compile(candidates[0])
                if _loaded:
                    _module = importlib.import_module(f"prism_kernels.{_loaded}")
    return bool(_loaded)


def module():
    """The loaded extension module, or None when no variant is built."""
    load()
    return _module


def variant() -> str:
    """Which C++ build is in use ('' when none is built: the torch backend serves CPU tensors)."""
    load()
    return _loaded

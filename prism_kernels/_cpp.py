"""Loads the C++ CPU kernels, picking the build for this CPU's best ISA.

setup.py builds one extension per capability (default, AVX2, AVX512); loading
the widest one the CPU supports keeps a wheel portable without ever executing
an illegal instruction. The extensions register nothing with torch: each is a
plain Python module with `attention(...)` and `segment_means(...)` functions,
which the CPU implementation of the `prism` ops (prism_kernels/ops.py) calls
when the selected backend is "cpp". Only one variant is loaded per process.
"""
from __future__ import annotations

import importlib
import os

import torch

_loaded = None  # name of the loaded variant, or "" when none could load
_module = None  # the loaded extension module (None when none is built)
_VARIANTS = {"AVX512": ["_C_avx512", "_C_avx2", "_C_default"],
             "AVX2": ["_C_avx2", "_C_default"]}


def _candidates():
    forced = os.environ.get("PRISM_CPU_CAPABILITY", "").upper()
    cap = forced or torch.backends.cpu.get_cpu_capability()
    return _VARIANTS.get(cap, ["_C_default"])


def load() -> bool:
    """Import the best extension variant once; False when none is built."""
    global _loaded, _module
    if _loaded is None:
        _loaded = ""
        if os.environ.get("PRISM_DISABLE_CPP") != "1":
            for name in _candidates():
                try:
                    _module = importlib.import_module(f"prism_kernels.{name}")
                except ImportError:
                    continue
                _loaded = name
                break
    return bool(_loaded)


def module():
    """The loaded extension module, or None when no variant is built."""
    load()
    return _module


def variant() -> str:
    """Which C++ build is in use ('' when none is built: the torch backend serves CPU tensors)."""
    load()
    return _loaded

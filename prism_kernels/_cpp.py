"""Loads the C++ CPU kernels, picking the build for this CPU's best ISA.

setup.py builds one extension per capability (default, AVX2, AVX512); loading
the widest one the CPU supports keeps a wheel portable without ever executing
an illegal instruction. Only one variant may load: each registers the CPU
kernels of the `prism` ops.
"""
from __future__ import annotations

import importlib
import os

import torch

_loaded = None  # name of the loaded variant, or "" when none could load
_VARIANTS = {"AVX512": ["_C_avx512", "_C_avx2", "_C_default"],
             "AVX2": ["_C_avx2", "_C_default"]}


def _candidates():
    forced = os.environ.get("PRISM_CPU_CAPABILITY", "").upper()
    cap = forced or torch.backends.cpu.get_cpu_capability()
    return _VARIANTS.get(cap, ["_C_default"])


def load() -> bool:
    """Import the best extension variant once; False when none is built."""
    global _loaded
    if _loaded is None:
        _loaded = ""
        if os.environ.get("PRISM_DISABLE_CPP") != "1":
            for name in _candidates():
                try:
                    importlib.import_module(f"prism_kernels.{name}")
                except ImportError:
                    continue
                _loaded = name
                break
    return bool(_loaded)


def variant() -> str:
    """Which C++ build is in use ('' when the reference serves CPU tensors)."""
    load()
    return _loaded

"""Compile the C++ CPU kernels for this CPU ahead of first use.

    python -m prism_kernels.build

Importing prism_kernels loads a built variant or compiles the native one (see
prism_kernels/_build.py for where and how); this command does that with the
progress on stderr, retries a build that failed before, and says which variant
loaded. Exit status 0 when the C++ kernels are in use.
"""
from __future__ import annotations

import os
import subprocess
import sys

from ._build import _log, skip_requested


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m prism_kernels.build",
        description="Compile the C++ CPU kernels for this CPU ahead of first use and report which "
                    "variant loads.")
    parser.parse_args(argv)
    if skip_requested():
        _log("PRISM_SKIP_CPP=1 is set: nothing to build (unset it to compile)")
        return 1
    # Importing the package (done before this runs) loaded a built variant or
    # compiled the native one.
    from . import _build, _cpp
    if not _cpp.variant() and not _cpp._attempted and os.environ.get("PRISM_DISABLE_CPP") != "1":
        # Skipped because an earlier build failed: forget that and retry in a
        # fresh process (this one already gave the ops their fallback kernels).
        name = _cpp._candidates()[0]
        marker = _build.cache_dir(name[len("_C_"):]) / _build.FAILED_MARKER
        if marker.exists():
            _log(f"retrying the build that failed before ({marker.read_text().strip()[:200]})")
            marker.unlink()
        code = "import sys, prism_kernels as pk; sys.exit(0 if pk.cpp_variant() else 1)"
        if subprocess.run([sys.executable, "-c", code]).returncode != 0:
            _log("build failed (compiler output above)")
            return 1
        _log("C++ kernels ready (they load at the next import)")
        return 0
    name = _cpp.variant()
    if not name:
        _log(f"no C++ variant loaded; CPU tensors use the PyTorch fallback. {_cpp._error}")
        return 1
    mod = sys.modules[f"prism_kernels.{name}"]
    print(f"prism_kernels: C++ kernels ready: {name} ({mod.capability()}) from {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

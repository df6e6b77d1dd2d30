"""Build script: the C++ CPU kernels are optional at build time.

* torch importable in the build environment (`pip install --no-build-isolation`,
  or `python setup.py ...` in a venv with torch): compile the kernels for this
  CPU's widest ISA into prism_kernels._C_<variant>, against that torch.
  PRISM_CPU_VARIANTS=all (or e.g. "default,avx2") builds several, for a wheel
  that runs on any x86 CPU; prism_kernels/_cpp.py loads the widest one the CPU
  supports.
* torch not importable (the default isolated build of `pip install .`, `pip
  wheel`, `python -m build`): no extension; the package compiles the kernels
  on first import, into a cache (prism_kernels/_build.py), against whatever
  torch is installed then. torch is deliberately not a build requirement: an
  isolated build would download one, possibly a multi-GB CUDA build.

PRISM_SKIP_CPP=1 builds no extension. PRISM_SANITIZE=1 compiles with ASan/UBSan.
The flags live in prism_kernels/_build.py, shared with the compile on first use.
"""
import importlib.util
import pathlib
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_prism_build", ROOT / "prism_kernels" / "_build.py")
pb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)


def _say(msg):
    print(f"prism-kernels setup: {msg}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package (prism_kernels/csrc/), so an installed
    package can compile the kernels on first use. Editable installs read the
    source tree's csrc/ instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = pathlib.Path(self.build_lib) / "prism_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*")):
            if src.suffix in (".cpp", ".h"):
                shutil.copy2(src, dest / src.name)


def _extensions():
    if pb.skip_requested():
        _say("PRISM_SKIP_CPP=1: not compiling the C++ kernels (CPU tensors use the PyTorch fallback)")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say("torch is not importable in this build environment: the C++ kernels will compile "
             "on first import (or run `python -m prism_kernels.build`); to compile now, install "
             "torch first and build with `pip install --no-build-isolation`")
        return [], {}
    variants = pb.requested_variants()
    _say(f"C++ CPU kernels: variant(s) {', '.join(variants)} against torch {torch.__version__}, compiled "
         f"by build_ext (about a minute each on 2 cores; pip shows the compiler lines with -v)")
    srcs = [str(pathlib.Path("csrc") / pathlib.Path(s).name) for s in pb.sources(ROOT / "csrc")]
    exts = [CppExtension(f"prism_kernels._C_{v}", srcs, extra_compile_args=pb.cflags(v),
                         extra_link_args=pb.ldflags())
            for v in variants]
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(
    # python_ref is the tests' oracle: never installed (tests import it from the repository root)
    packages=find_packages(include=["prism_kernels", "prism_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

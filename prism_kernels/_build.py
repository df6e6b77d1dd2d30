"""How the C++ CPU kernels (csrc/) are compiled: flags, variants, JIT cache.

`python -m prism_kernels.build` (prism_kernels/build.py) compiles them ahead of
first use. One variant is built: the widest ISA this CPU supports, as torch sees it
(torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, else default). There
are two ways the kernels get built, both with the flags below:

* at install time, by setup.py, when torch is importable in the build
  environment (`pip install --no-build-isolation ...`): the module lands in the
  package as prism_kernels._C_<variant>. PRISM_CPU_VARIANTS=default,avx2,avx512
  (or `all`) builds every variant, for a wheel that runs on any x86 CPU;
* otherwise on first use (`import prism_kernels`), with
  torch.utils.cpp_extension.load, into a cache directory:
  $PRISM_CACHE_DIR, else $XDG_CACHE_HOME/prism_kernels, else
  ~/.cache/prism_kernels, one folder per <torch version>-<python>-<variant>.
  `python -m prism_kernels.build` does the same ahead of time.

PRISM_SKIP_CPP=1 skips both: CPU tensors then use the pure-PyTorch fallback.

This file imports nothing from the package at module level, so setup.py can load
it by path before the package (or torch) is importable.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

VARIANTS = ("default", "avx2", "avx512")

# CPU_CAPABILITY_* is what at::vec keys its specialisations on.
VARIANT_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}

FAILED_MARKER = "BUILD_FAILED.txt"


class EarlierBuildFailed(RuntimeError):
    """The cache holds a failed build of this variant; not retried on import."""


def skip_requested() -> bool:
    return os.environ.get("PRISM_SKIP_CPP") == "1"


def sanitize_requested() -> bool:
    return os.environ.get("PRISM_SANITIZE") == "1"


def cflags(variant: str) -> list[str]:
    if sanitize_requested():
        base = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fopenmp",
                "-std=c++20"]
    else:
        base = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-Wno-unknown-pragmas"]
    return base + VARIANT_FLAGS[variant] + [f"-DPRISM_EXT_NAME=_C_{variant}"]


def ldflags() -> list[str]:
    return ["-fopenmp"] + (["-fsanitize=address,undefined"] if sanitize_requested() else [])


def native_variant(capability: str | None = None) -> str:
    """The variant for this CPU: 'avx512', 'avx2' or 'default'.

    PRISM_CPU_CAPABILITY (DEFAULT/AVX2/AVX512) overrides what torch detects.
    """
    if capability is None:
        capability = os.environ.get("PRISM_CPU_CAPABILITY", "").upper()
    if not capability:
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability.upper(), "default")


def requested_variants() -> list[str]:
    """PRISM_CPU_VARIANTS (comma-separated, or `all`), else the native one."""
    only = os.environ.get("PRISM_CPU_VARIANTS", "").strip()
    if not only:
        return [native_variant()]
    if only == "all":
        return list(VARIANTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"PRISM_CPU_VARIANTS: unknown variant(s) {bad}; choose from {VARIANTS} or 'all'")
    return names


def source_dir() -> pathlib.Path:
    """csrc/: the copy shipped inside the installed package, else the source tree's."""
    here = pathlib.Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "module.cpp").is_file():
            return cand
    raise FileNotFoundError(f"C++ sources not found (looked in {here / 'csrc'} and {here.parent / 'csrc'})")


def sources(root: pathlib.Path | None = None) -> list[str]:
    root = source_dir() if root is None else root
    return sorted(str(p) for p in root.glob("*.cpp"))


def cache_root() -> pathlib.Path:
    if os.environ.get("PRISM_CACHE_DIR"):
        return pathlib.Path(os.environ["PRISM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "prism_kernels"


def _sources_tag() -> str:
    """A short hash of where the sources are and what they say: torch's build files name
    the sources by path, so two checkouts (or an edited one) sharing one build folder
    would rebuild each other's extension on every start."""
    import hashlib
    root = source_dir()
    h = hashlib.sha1(str(root).encode())
    for f in sorted(root.glob("*.cpp")) + sorted(root.glob("*.h")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def cache_dir(variant: str) -> pathlib.Path:
    import torch
    tag = f"{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{variant}-{_sources_tag()}"
    if sanitize_requested():
        tag += "-sanitize"
    return cache_root() / tag


def _log(msg: str) -> None:
    print(f"prism_kernels: {msg}", file=sys.stderr, flush=True)


def jit_build(variant: str, *, retry_failed: bool = False):
    """Compile (or reuse from the cache) and import one variant; returns the module.

    Progress (ninja's [i/n] lines) goes to stderr. A failed build leaves a marker
    in its cache folder so later imports do not retry it on every start; pass
    retry_failed=True (`python -m prism_kernels.build` does) to try again.
    Raises on failure.
    """
    from torch.utils import cpp_extension

    build_dir = cache_dir(variant)
    build_dir.mkdir(parents=True, exist_ok=True)
    marker = build_dir / FAILED_MARKER
    if marker.exists():
        if not retry_failed:
            raise EarlierBuildFailed(f"an earlier build failed, see {marker}")
        marker.unlink()
    name = f"_C_{variant}"
    # found before the build: a copy of the package without its sources must not leave
    # a failure marker in the shared cache for the installs that have them
    srcs = sources()
    # torch skips the compile when the sources and flags are unchanged since the
    # last build in build_dir, so this is cheap once the cache is warm.
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        _log(f"compiling the C++ CPU kernels ({variant}) into {build_dir}; "
             "this happens once per torch version and takes 1-3 minutes "
             "(PRISM_SKIP_CPP=1 skips it)")
    t0 = time.perf_counter()
    # torch prints its progress (and ninja's) on stdout: send it to stderr so the
    # output of the program that imported us stays clean.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        module = cpp_extension.load(
            name=name, sources=srcs, extra_cflags=cflags(variant), extra_ldflags=ldflags(),
            build_directory=str(build_dir), verbose=fresh)
    except Exception as e:  # not KeyboardInterrupt: an interrupted build is retried next time
        try:
            marker.write_text(f"{type(e).__name__}: {e}\n")
        except OSError:
            pass
        raise
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if fresh:
        _log(f"compiled {name} in {time.perf_counter() - t0:.0f} s")
    # Importable under the name an install-time build has.
    sys.modules[f"prism_kernels.{name}"] = module
    return module

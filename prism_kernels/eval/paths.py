"""Where the fetched packages, data sets and converted models live, and where
`prism eval` writes its results by default. Both are outside any checkout:

* cache:   $PRISM_CACHE, else $XDG_CACHE_HOME/prism-kernels, else ~/.cache/prism-kernels
* results: $PRISM_EVAL_OUT, else <cache>/eval  (`prism eval --out DIR` overrides both)
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("PRISM_CACHE"):
        return Path(os.environ["PRISM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "prism-kernels"


def results_dir() -> Path:
    """The default output folder of `prism eval`."""
    if os.environ.get("PRISM_EVAL_OUT"):
        return Path(os.environ["PRISM_EVAL_OUT"]).expanduser()
    return cache_dir() / "eval"


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def pkg_dir(name: str) -> Path:
    return cache_dir() / "pkgs" / name


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


class MissingDataError(FileNotFoundError):
    """A data set or model is not in the cache; `prism eval` fetches it unless --no-fetch."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{what} not found at {path}; run `python -m prism_kernels.eval.fetch` "
            f"(cache: {cache_dir()}, override with PRISM_CACHE)")
    return path

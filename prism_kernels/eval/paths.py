"""Where the fetched packages, data sets and converted models live."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism-kernels"))


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def pkg_dir(name: str) -> Path:
    return cache_dir() / "pkgs" / name


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


class MissingDataError(FileNotFoundError):
    """A data set or model is not in the cache; run fetch_data.sh."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{what} not found at {path}; run `bash benchmarks/accuracy/fetch_data.sh` "
            f"(cache: {cache_dir()}, override with PRISM_CACHE)")
    return path

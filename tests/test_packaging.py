"""Packaging: the sdist carries what the C++ build needs, the license is there,
torch is no build requirement, and the built package carries the C++ sources
(for the compile on first use). Compiles nothing; a few seconds."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sdist_files():
    """The files MANIFEST.in selects, by setuptools' own rules (what `sdist` adds
    beyond the Python packages, setup.py, pyproject.toml and the README)."""
    from setuptools.command.egg_info import FileList

    fl = FileList()
    fl.findall(str(ROOT))
    fl.files = []
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            fl.process_template_line(line)
    return {pathlib.Path(f).resolve().relative_to(ROOT).as_posix() for f in fl.files}


def _build_inputs():
    """Every file under csrc/ the C++ build reads: the .cpp sources and, transitively,
    the headers they include with quotes."""
    csrc = ROOT / "csrc"
    need, todo = set(), sorted(csrc.glob("*.cpp"))
    assert todo, "no C++ sources in csrc/"
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in need:
            continue
        need.add(rel)
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M):
            dep = path.parent / inc
            assert dep.is_file(), f"{rel} includes {inc!r}, which does not exist"
            todo.append(dep)
    return need


def test_manifest_carries_every_file_the_cpp_build_needs():
    missing = sorted(_build_inputs() - _sdist_files())
    assert missing == [], f"MANIFEST.in does not match these files the C++ build needs: {missing}"


def test_manifest_carries_license_and_package_data():
    files = _sdist_files()
    data = [p.relative_to(ROOT).as_posix() for p in (ROOT / "prism_kernels" / "data").glob("*.txt")]
    assert data, "prism_kernels/data/*.txt is empty"
    missing = sorted({"LICENSE", "README.md", "requirements.txt", *data} - files)
    assert missing == [], f"MANIFEST.in does not match: {missing}"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'^license\s*=\s*"Apache-2.0"', (ROOT / "pyproject.toml").read_text(), re.M)


def test_torch_is_not_a_build_requirement():
    """An isolated build (plain `pip install .`) would download the newest torch,
    a multi-GB CUDA build, just to compile against it."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = meta["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"torch\b", r)], requires
    assert meta["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]


def test_built_package_carries_cpp_sources(tmp_path):
    """`build_py` (what every wheel is made of) copies csrc/ into prism_kernels/csrc/,
    and the first-use compile finds exactly those sources there."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PRISM_SKIP_CPP": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    shipped = tmp_path / "prism_kernels" / "csrc"
    want = sorted(pathlib.Path(p).name for p in _build_inputs())
    assert sorted(p.name for p in shipped.iterdir()) == want
    assert (tmp_path / "prism_kernels" / "data" / "sentences.txt").is_file()
    assert (tmp_path / "prism_kernels" / "build.py").is_file()

    spec = importlib.util.spec_from_file_location("_prism_build_shipped",
                                                  tmp_path / "prism_kernels" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.source_dir() == shipped
    assert [pathlib.Path(s).name for s in mod.sources()] == sorted(n for n in want if n.endswith(".cpp"))


def test_the_oracle_is_not_packaged():
    """python_ref is the tests' oracle: setup.py must not ship it (a generic top-level
    name in site-packages), and nothing in the package may need it."""
    text = (ROOT / "setup.py").read_text()
    assert 'find_packages(include=["prism_kernels", "prism_kernels.*"])' in text
    assert "python_ref" not in text.split("setup(", 1)[1].replace("# python_ref is the tests' oracle", "")

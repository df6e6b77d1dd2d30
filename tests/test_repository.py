"""The repository's own rules, checked on its files: the oracle is only the tests'
oracle, the package has no import cycles, and nothing points outside the repository."""
import ast
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "prism_kernels"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def _imports(name, path, is_pkg):
    """Every module this file imports (module level or inside functions)."""
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:            # `from . import x` imports the submodule x
                yield f"{mod}.{a.name}"


def test_no_production_module_imports_the_oracle():
    offenders = [str(p.relative_to(ROOT)) for n, p, pkg in _modules()
                 if any(m == "python_ref" or m.startswith("python_ref.") for m in _imports(n, p, pkg))]
    assert offenders == [], f"modules importing python_ref (the tests' oracle): {offenders}"


def test_no_import_cycles_inside_the_package():
    mods = {n: (p, pkg) for n, p, pkg in _modules()}
    graph = {n: sorted({m for m in _imports(n, p, pkg) if m in mods and m != n
                        and not n.startswith(m + ".")})   # a submodule importing its own package is fine
             for n, (p, pkg) in mods.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert cycles == [], f"import cycles: {cycles}"


def test_nothing_points_outside_the_repository():
    # assembled from parts so that this line does not match itself in repository-wide searches
    spec = "SP" + "EC"
    pattern = re.compile(r"\.\./" + "shared|" + spec + " sec|" + spec + r"\.md|\bis" + r"sue #?[0-9]+")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if f.startswith("benchmarks/results/"):
            continue   # results are dated records of their time
        path = ROOT / f
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:100]}")
    assert hits == [], "references to documents outside the repository:\n" + "\n".join(hits)

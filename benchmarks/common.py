"""Small, generic benchmark helpers: interleaved median timing, machine info,
result files. Other benchmark scripts may import this; keep it dependency-free
(torch only)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, str]:
    """What a reader needs to interpret timings (the machine may be shared)."""
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "n/a"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg": load,
    }
    try:
        import subprocess
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "n/a"
    except Exception:  # noqa: BLE001 - informative only
        pass
    try:
        import prism_kernels as pk
        info["prism_cpp_variant"] = pk.cpp_variant() or "none (reference)"
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


def _time_once(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved_medians(fns: Dict[str, Callable[[], object]], reps: int = 15, warmup: int = 2,
                        min_time: float = 2e-3, max_inner: int = 200) -> Dict[str, Dict[str, float]]:
    """Median seconds per call of each fn, timed round-robin so that load
    changes on a shared machine hit every method alike.

    Each sample runs `inner` back-to-back calls (chosen so a sample lasts at
    least `min_time`); the order of the methods rotates every round.
    Returns {name: {"median": s, "q1": s, "q3": s, "n": reps}}.
    """
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t = _time_once(fns[name], 1)
        inner[name] = max(1, min(max_inner, int(min_time / max(t, 1e-9))))
    samples = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(_time_once(fns[name], inner[name]))
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = {"median": statistics.median(s), "q1": q[0], "q3": q[2], "n": len(s)}
    return out


def format_table(headers: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    headers = [str(h) for h in headers]
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def write_result(path: str, title: str, info: Dict[str, str], body: str,
                 append: bool = False) -> None:
    """Write (or append) a markdown section with the machine info and a body."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    head = f"## {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n"
    with open(path, "a" if append else "w") as f:
        f.write(head + body.rstrip() + "\n\n")


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"

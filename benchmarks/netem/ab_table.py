"""Two code versions compared in alternating run_latency.sh launches: one row per
(model, mode, bandwidth) with every launch's median latency and change against one
device (timed in the same launch), for the files of each version.

    python benchmarks/netem/ab_table.py --a before1.csv before2.csv --b after1.csv after2.csv \
        [--names before after]
"""
from __future__ import annotations

import argparse
import csv
import statistics


def rows(paths):
    out = {}
    for p in paths:
        for r in csv.DictReader(open(p)):
            if r["mode"] == "single":
                continue
            out.setdefault((r["model"], r["mode"], r["bandwidth_mbit"]), []).append(
                (float(r["median_ms"]), float(r["change_vs_single_pct"])))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", nargs="+", required=True)
    ap.add_argument("--b", nargs="+", required=True)
    ap.add_argument("--names", nargs=2, default=["before", "after"])
    a = ap.parse_args(argv)
    A, B = rows(a.a), rows(a.b)
    na, nb = a.names
    print(f"| model | mode | Mbit/s | {na}: change per launch (latency ms) | {nb}: change per launch (latency ms) "
          f"| mean change, {na} -> {nb} |")
    print("|---|---|---|---|---|---|")
    for k in sorted(set(A) & set(B)):
        fa = ", ".join(f"{c:+.1f}% ({m:.1f})" for m, c in A[k])
        fb = ", ".join(f"{c:+.1f}% ({m:.1f})" for m, c in B[k])
        ma, mb = statistics.mean(c for _, c in A[k]), statistics.mean(c for _, c in B[k])
        print(f"| {k[0]} | {k[1]} | {k[2]} | {fa} | {fb} | {ma:+.1f}% -> {mb:+.1f}% |")


if __name__ == "__main__":
    main()

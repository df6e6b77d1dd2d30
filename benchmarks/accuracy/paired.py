"""Paired differences between two Prism cells of one task (same test items, same seed):
what a variant gains over another (e.g. over the default), with the paired bootstrap
interval of prism_kernels.eval.metrics (items, or text windows, resampled; seed 0).

Needs cells stored with their per-item results (`item_hits`, `item_cosine`; for
smollm2-austen `window_bits`, `window_chars`), which `prism eval` writes.

Usage:
  python benchmarks/accuracy/paired.py DIR/accuracy_<task>.json [--base VARIANT] [--md]
prints, for every P and CR that has the base variant (default: "default"), each other
variant minus the base: probe accuracy, cosine to exact (classification tasks) or bits
per character (smollm2-austen), each with its 95 % interval.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from prism_kernels.eval.metrics import paired_bootstrap_diff, ratio_bootstrap


def _parse(key: str):
    """'prism|P=2|CR=9.9|avg=attention_input|opt=anchors=none,...' -> (P, CR, variant);
    cells with the other averaging are named 'avg=block_input[,opt]'."""
    parts = key.split("|")
    if parts[0] != "prism":
        return None
    P = int(parts[1][2:])
    cr = parts[2][3:]
    opts = [p[4:] for p in parts[4:] if p.startswith("opt=")]
    variant = ",".join(opts) or "default"
    if parts[3] != "avg=attention_input":
        variant = parts[3] + ("," + variant if opts else "")
    return P, cr, variant


def compare(cells: dict, base: str = "default"):
    by = defaultdict(dict)
    for key, c in cells.items():
        k = _parse(key)
        if k is not None:
            by[(k[0], k[1])][k[2]] = c
    rows = []
    for (P, cr), vs in sorted(by.items()):
        b = vs.get(base)
        if b is None:
            continue
        for name, c in sorted(vs.items()):
            if name == base:
                continue
            row = {"P": P, "CR": cr, "variant": name, "base": base}
            if "item_hits" in c and "item_hits" in b:
                a = np.array([ch == "1" for ch in c["item_hits"]], dtype=float)
                r = np.array([ch == "1" for ch in b["item_hits"]], dtype=float)
                d, lo, hi = paired_bootstrap_diff(a, r)
                row["accuracy"] = (100 * d, 100 * lo, 100 * hi, len(a))
                d, lo, hi = paired_bootstrap_diff(c["item_cosine"], b["item_cosine"])
                row["cosine"] = (d, lo, hi, len(a))
            if "window_chars" in c and "window_chars" in b:
                chars = np.array(c["window_chars"], dtype=float)
                rb = ratio_bootstrap(c["window_bits"], chars, b["window_bits"])
                row["bpc"] = (rb["diff"], rb["diff_ci"][0], rb["diff_ci"][1], len(chars))
            if len(row) > 4:
                rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--base", default="default")
    args = ap.parse_args(argv)
    cells = json.load(open(args.json))["cells"]
    print("| P | CR | variant | minus | n | Δ probe accuracy (points) | Δ cosine to exact | Δ bits per character |")
    print("|---|---|---|---|---|---|---|---|")
    for r in compare(cells, args.base):
        f = lambda k, fmt: "" if k not in r else (fmt.format(*r[k][:3]))
        n = next(r[k][3] for k in ("accuracy", "bpc") if k in r)
        print(f"| {r['P']} | {r['CR']} | {r['variant']} | {r['base']} | {n} | "
              f"{f('accuracy', '{:+.1f} [{:+.1f}, {:+.1f}]')} | {f('cosine', '{:+.4f} [{:+.4f}, {:+.4f}]')} | "
              f"{f('bpc', '{:+.4f} [{:+.4f}, {:+.4f}]')} |")


if __name__ == "__main__":
    main()

"""Plot benchmarks/results/latency_<tag>.csv (paper Fig. 5) and write a markdown summary."""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="fig5")
    args = ap.parse_args()
    res = ROOT / "benchmarks" / "results"
    rows = list(csv.DictReader(open(res / f"latency_{args.tag}.csv")))
    cond = {}
    jp = res / f"latency_{args.tag}.json"
    if jp.exists():
        cond = json.loads(jp.read_text()).get("conditions", {})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    md = [f"# Latency on an emulated edge link ({args.tag})", "",
          "Two network namespaces joined by a veth pair shaped with tc tbf (both directions), "
          "one process per namespace, one torch thread per rank, batch 1, random weights, fp32. "
          "Median of the timed runs (end to end on rank 0: embed, scatter, blocks, gather, head). "
          "Single device: mean of the medians measured at the start and at the end of the sweep. "
          "'vs single' is the latency change (negative = faster).", ""]
    if cond:
        md += ["Conditions: " + ", ".join(f"{k}={v}" for k, v in cond.items()), ""]
    for ax, model in zip(axes[0], models):
        single = [float(r["median_ms"]) for r in rows if r["model"] == model and r["mode"] == "single"]
        single = sum(single) / len(single) if single else None   # mean of the start and end runs
        series = defaultdict(list)
        for r in rows:
            if r["model"] == model and r["mode"] != "single":
                series[r["mode"]].append((int(r["bandwidth_mbit"]), float(r["median_ms"])))
        for mode, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode} (P=2)")
        if single is not None:
            ax.axhline(single, color="gray", linestyle="--", label="single device")
        ax.set_xscale("log")
        bws = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(bws)
        ax.set_xticklabels([str(b) for b in bws])
        ax.set_xlabel("bandwidth (Mbit/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(model)
        ax.legend()
        md += [f"## {model}", "", "| bandwidth (Mbit/s) | single (ms) | voltage P=2 (ms) | prism P=2 (ms) | "
               "prism vs single | voltage vs single |", "|---|---|---|---|---|---|"]
        v = dict(series.get("voltage", []))
        p = dict(series.get("prism", []))
        for bw in bws:
            pv, vv = p.get(bw), v.get(bw)
            red = f"{100 * (pv / single - 1):+.1f}%" if pv and single else ""
            vred = f"{100 * (vv / single - 1):+.1f}%" if vv and single else ""
            md.append(f"| {bw} | {single:.1f} | {vv:.1f} | {pv:.1f} | {red} | {vred} |")
        md.append("")
        loads = [float(r["loadavg_before"]) for r in rows if r["model"] == model]
        md += [f"Load average (1 min) before the runs: {min(loads):.2f} to {max(loads):.2f}.", ""]
    fig.tight_layout()
    fig.savefig(res / f"latency_{args.tag}.png", dpi=120)
    (res / f"latency_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

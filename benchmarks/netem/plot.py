"""Plot benchmarks/results/latency_<tag>.csv (paper Fig. 5) and write a markdown summary."""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The paper gives its Fig. 5 in numbers only at 200 Mbit/s (2 CPU cores at 2.1 GHz): Prism
# -43.3 % against one device for ViT at P = 2 (and -52.6 % for a second setting, which this
# benchmark does not run); no BERT figure
PAPER_CHANGE_PCT = {"vit-b16": {200: -43.3}}


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
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    md = [f"# Latency on an emulated edge link ({args.tag})", "",
          "Two network namespaces joined by a veth pair shaped with tc tbf (both directions), "
          "one process per namespace, one torch thread per rank, batch 1, random weights, fp32. "
          "Median of the timed runs (end to end on rank 0: embed, scatter, blocks, gather, head). "
          "Every P = 2 launch also times the stock model alone on rank 0 (same machine, same load) "
          "before each of its runs; 'change vs single' compares the two medians of that launch "
          "(negative = faster). The single device in its own launch is the dashed line; 'vs own "
          "launch' compares with it (on a machine whose speed drifts the two references can differ; "
          "the larger latency of the two makes the change look better).", ""]
    if cond:
        md += ["Conditions: " + ", ".join(f"{k}={v}" for k, v in cond.items() if k != "cpu_scaling"), ""]
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        alone = [float(r["median_ms"]) for r in mrows if r["mode"] == "single"]
        series = defaultdict(list)
        singles = []
        for r in mrows:
            if r["mode"] != "single":
                bw = int(r["bandwidth_mbit"])
                series[r["mode"]].append((bw, float(r["median_ms"]), float(r["single_median_ms"]),
                                          float(r["change_vs_single_pct"])))
                singles.append((bw, float(r["single_median_ms"])))
        for mode, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode} (P=2)")
        singles.sort()
        ax.plot([s[0] for s in singles], [s[1] for s in singles], "x", color="gray",
                label="single device (timed in the same launches)")
        if alone:
            ax.axhline(alone[0], color="gray", linestyle="--", label="single device (own launch)")
        ax.set_xscale("log")
        bws = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(bws)
        ax.set_xticklabels([str(b) for b in bws])
        ax.set_xlabel("bandwidth (Mbit/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(model)
        ax.legend(fontsize=7)
        # relative change against the single device of the same launch, with the paper's points
        ax2 = axes[1][models.index(model)]
        for mode, pts in series.items():
            ax2.plot([p[0] for p in pts], [p[3] for p in pts], marker="o", label=f"{mode} (P=2)")
        for bw, pct in PAPER_CHANGE_PCT.get(model, {}).items():
            ax2.plot([bw], [pct], "*", color="black", markersize=12, label=f"paper, Prism ({pct:+.1f}%)")
        ax2.axhline(0, color="gray", linewidth=0.8)
        ax2.set_xscale("log")
        ax2.set_xticks(bws)
        ax2.set_xticklabels([str(b) for b in bws])
        ax2.set_xlabel("bandwidth (Mbit/s)")
        ax2.set_ylabel("latency change vs one device (%)")
        ax2.legend(fontsize=7)
        md += [f"## {model}", "",
               f"Single device in its own launch: {alone[0]:.1f} ms." if alone else "", "",
               "| bandwidth (Mbit/s) | mode (P = 2) | latency (ms) | single device, same launch (ms) | "
               "change vs single | vs own launch | time blocked waiting, rank 0 / rank 1 (ms) | posting "
               "transfers, rank 0 / rank 1 (ms) | own forward, rank 0 / rank 1 (ms) |",
               "|---|---|---|---|---|---|---|---|---|"]
        waits = {(int(r["bandwidth_mbit"]), r["mode"]): (r["wait_ms_rank0"], r["wait_ms_rank1"],
                                                          r.get("post_ms_rank0", ""), r.get("post_ms_rank1", ""),
                                                          r.get("total_ms_rank0", ""), r.get("total_ms_rank1", ""))
                 for r in mrows if r["mode"] != "single"}
        for bw in bws:
            for mode, pts in series.items():
                for p in pts:
                    if p[0] == bw:
                        w = waits[(bw, mode)]
                        own = f"{100 * (p[1] / alone[0] - 1):+.1f}%" if alone else "-"
                        md.append(f"| {bw} | {mode} | {p[1]:.1f} | {p[2]:.1f} | {p[3]:+.1f}% | {own} "
                                  f"| {w[0]} / {w[1]} | {w[2]} / {w[3]} | {w[4]} / {w[5]} |")
        if model in PAPER_CHANGE_PCT:
            md.append("")
            md.append("The paper reports Prism at " + ", ".join(
                f"{bw} Mbit/s: {pct:+.1f}%" for bw, pct in PAPER_CHANGE_PCT[model].items())
                + " against one device (P = 2, 2 CPU cores at 2.1 GHz; the only point its text gives).")
        md.append("")
        loads = [float(r["loadavg_before"]) for r in mrows]
        md += [f"Load average (1 min) before the runs: {min(loads):.2f} to {max(loads):.2f}.", ""]
    cpu = cond.get("cpu_scaling") if cond else None
    if cpu:
        md += ["## What P = 2 can gain on this machine (benchmarks/netem/cpu_scaling.py)", "",
               f"{cpu['family']}-{cpu['size']} blocks on {cpu['half_rows']} of {cpu['tokens']} tokens: "
               f"{cpu['half_alone_ms']} ms in one process alone, {cpu['half_two_processes_ms']} ms in two processes "
               f"at once (CPU 0 and CPU 1); the whole model in one process {cpu['full_one_process_ms']} ms. "
               f"Two concurrent processes each run {cpu['slowdown_when_both_cpus_busy']}x slower, so even with "
               f"a free network the best P = 2 latency change is {-cpu['best_possible_p2_latency_cut_pct']:+.1f}%.", ""]
    fig.tight_layout()
    fig.savefig(res / f"latency_{args.tag}.png", dpi=120)
    (res / f"latency_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

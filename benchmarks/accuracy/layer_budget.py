"""Rows per layer (an experiment of the simulation): does the same total budget do better
when the later layers get more rows than the early ones?

DINOv2-S with the package's default policy (P, CR as given). A two-level allocation
gives layers 0..L/2-1 the compression rate CR * a and layers L/2..L-1 the smallest CR
(most rows) that keeps the total rows sent per inference at most the uniform
allocation's. The allocation (uniform included) is chosen on `--n-select` *training* images by the cosine
of the probe features to exact (the test items are not used to choose); then the uniform
and every candidate allocation are scored on the test items with the exact model's
probe (no refit), paired with the uniform one (same items, paired bootstrap).

    python benchmarks/accuracy/layer_budget.py --task dinov2-fashion --partitions 2 --cr 9.9 \\
        [--image-size 112] [--n-select 200] [--out benchmarks/results/layer_budget]

Writes OUT/layer_budget_<task>_<px>px_P<P>.json and .md (`--report-only` rewrites the
table from the JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from prism_kernels import hf as phf
from prism_kernels.config import PrismConfig
from prism_kernels.eval import models as Mo
from prism_kernels.eval.metrics import paired_bootstrap_diff, t_interval, wilson_interval
from prism_kernels.eval.tasks import get_task
from prism_kernels.models import token_roles

ROOT = Path(__file__).resolve().parents[2]
EARLY_FACTORS = (1.5, 2.0, 3.0)         # early layers' CR = CR * a


def rows(cr: float, P: int, n: int, roles) -> int:
    """Rows all partitions send in one layer under the default policy at rate cr."""
    return sum(PrismConfig(P, compression_rate=cr).plan(n, causal=False, roles=roles, static=True).means)


def allocation(cr: float, a: float, P: int, n: int, layers: int, roles):
    """(early CR, late CR): the late CR is the smallest on a fine grid whose total rows
    stay within the uniform allocation's."""
    budget = layers * rows(cr, P, n, roles)
    early = cr * a
    half = layers // 2
    used = half * rows(early, P, n, roles)
    late = cr
    for k in range(1, 400):                  # from cr down to 1 in steps of 1 %
        c = max(1.0, cr * (1 - 0.01 * k))
        if used + (layers - half) * rows(c, P, n, roles) > budget:
            break
        late = c
        if c == 1.0:
            break
    return early, late


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="dinov2-fashion", choices=("dinov2-fashion", "dinov2-digits"))
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--cr", type=float, default=9.9)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--n-select", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_budget")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table from the stored JSON")
    args = ap.parse_args()
    stem = args.out / f"layer_budget_{args.task}_{args.image_size}px_P{args.partitions}"
    if args.report_only:
        d = json.loads(stem.with_suffix(".json").read_text())
        write_report(stem, d, report(d))
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the eval task's split, model, exact features and probe (prism_kernels/eval/tasks.py)
    task = get_task(args.task, seed=args.seed, image_size=args.image_size, progress=False)
    task.setup()
    model, split, probe = task.model, task.split, task.probe
    layers = len(model.encoder.layer)
    n = (args.image_size // 14) ** 2 + 1
    roles = token_roles(model)

    @torch.no_grad()
    def feats(images):
        out = []
        for i in range(0, len(images), 25):
            px = Mo.image_pixels(images[i:i + 25], args.image_size)
            out.append(Mo.dinov2_features(model(pixel_values=px).last_hidden_state).numpy())
        return np.concatenate(out).astype(np.float64)

    def cosine(x, ref):
        return (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1))

    tr_exact, te_exact = task.train_feats.astype(np.float64), task.test_exact.astype(np.float64)
    exact_hits = task.exact_hits["accuracy"]

    phf.enable_prism(model, num_partitions=args.partitions, compression_rate=args.cr)
    base = model._prism_config

    def set_crs(crs):
        for L, layer in enumerate(model.encoder.layer):
            c = dataclasses.replace(base, compression_rate=crs[L])
            for m in layer.modules():
                m._prism_config = c

    cands = {"uniform": [args.cr] * layers}
    for a in EARLY_FACTORS:
        e, l_ = allocation(args.cr, a, args.partitions, n, layers, roles)
        cands[f"early CR x{a:g}"] = [e] * (layers // 2) + [l_] * (layers - layers // 2)
    sel = slice(0, args.n_select)
    sel_ref = tr_exact[sel]
    results = {}
    for name, crs in cands.items():
        set_crs(crs)
        total = sum(rows(c, args.partitions, n, roles) for c in crs)
        sel_cos = float(cosine(feats(split.x_train[sel]), sel_ref).mean())
        te = feats(split.x_test)
        hits = probe.predict(te) == split.y_test
        results[name] = {"crs": [round(c, 4) for c in crs], "rows_per_inference": total,
                         "select_cosine": sel_cos, "hits": hits.astype(int).tolist(),
                         "cosine": cosine(te, te_exact).tolist()}
    d = {"args": {k: str(v) for k, v in vars(args).items()}, "exact_accuracy": float(exact_hits.mean()),
         "n_train": len(split.y_train), "n_test": len(split.y_test),
         "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": round(time.time() - t0),
         "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(stem, d, report(d))


def report(d: dict) -> str:
    """The table of a stored run. The allocation chosen is the one (uniform included)
    with the highest cosine to exact on the selection images."""
    a, results = d["args"], d["results"]
    chosen = max(results, key=lambda k: results[k]["select_cosine"])
    d["chosen"] = chosen
    u = results["uniform"]
    lines = [f"# Rows per layer: {a['task']}, {a['image_size']} px, P = {a['partitions']}, CR {float(a['cr']):g}\n",
             f"DINOv2-S, the default policy, exact model's probe (no refit), seed {a['seed']}, "
             f"{d.get('n_train', '?')} training / {d.get('n_test', '?')} test images; allocation chosen on the "
             f"first {a['n_select']} training images by the cosine to exact (uniform included): **{chosen}**. "
             f"Exact probe accuracy {100 * d['exact_accuracy']:.1f} %. Δ: minus uniform on the same test items, "
             f"paired bootstrap 95 % interval. Written by benchmarks/accuracy/layer_budget.py"
             + (f", {d['date_utc']} UTC, {d['seconds']} s" if "date_utc" in d else "") + ".\n",
             "| allocation | CR early / late | rows per inference | selection cosine | probe accuracy (%) | "
             "Δ probe (points) | cosine to exact | Δ cosine |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h = np.array(r["hits"])
        lo, hi = wilson_interval(int(h.sum()), len(h))
        c, clo, chi = t_interval(r["cosine"])
        if name == "uniform":
            dp = dc = ""
        else:
            p_ = paired_bootstrap_diff(h, np.array(u["hits"]))
            e = paired_bootstrap_diff(r["cosine"], u["cosine"])
            dp = f"{100 * p_[0]:+.1f} [{100 * p_[1]:+.1f}, {100 * p_[2]:+.1f}]"
            dc = f"{e[0]:+.4f} [{e[1]:+.4f}, {e[2]:+.4f}]"
        star = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{star} | {r['crs'][0]:.3g} / {r['crs'][-1]:.3g} | {r['rows_per_inference']} | "
                     f"{r['select_cosine']:.4f} | {100 * h.mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {dp} | "
                     f"{c:.4f} [{clo:.4f}, {chi:.4f}] | {dc} |")
    return "\n".join(lines) + "\n"


def write_report(stem: Path, d: dict, text: str) -> None:
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(d))
    print(text)


if __name__ == "__main__":
    main()

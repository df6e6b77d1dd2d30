"""What one row per segment can reach (an experiment of the simulation, not the package).

A remote segment S stands in a receiver's softmax for two things per query q: its mass,
the log-sum-exp L_S(q) = log sum_{t in S} exp(s q.k_t), and its output, the
softmax_S(q)-weighted mean of its values. The default row (rows matched at the [CLS]
query, hf/matched_summary.py) gets both right at q = q_cls only: the score
s q.k~ + b for the mass, one value v~ for the output. This script replaces either or both
by the exact per-query quantity, which no row can carry, to split the loss between them:

* rows:   the default row (this script's own code; it must reproduce the package's cell)
* mass:   the exact L_S(q) for every query, the row's value v~
* value:  the row's score, the exact per-query output of the segment
* both:   both exact: the exact attention (a check of this script: cosine 1, exact accuracy)
* mass2:  the row's score plus the second-order term (s^2/2)(q-q0)' C (q-q0), with C the
          q0-weighted covariance of the segment's keys: what a sender could add with d*d
          floats per segment and head (a bound on any moment correction of the mass)
* shift+X / shift-X: the row's score plus X (natural-log units, X > 0 more weight on
          every remote segment), the row's value: is the row's mass the best of that family?

The segments, anchors and plan are the package's default ones (prism_kernels.dynamic),
so only the summary of each segment changes. DINOv2 tasks, non-causal, same-length
batches. Scored like layer_budget.py: the exact model's probe (no refit), paired with
the package's default on the same test items.

    python benchmarks/accuracy/oracle_bounds.py --task dinov2-digits --partitions 2 --cr 9.9 \\
        [--image-size 112] [--modes rows mass value both mass2] [--out DIR]

Writes OUT/oracle_<task>_<px>px_P<P>[_n<limit>][_<tag>].json and .md (`--report-only`
rewrites the table).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from prism_kernels import dynamic as dyn
from prism_kernels.eval.metrics import cosine_to_reference, paired_bootstrap_diff, t_interval, wilson_interval
from prism_kernels.eval.tasks import Cell, get_task
from prism_kernels.hf import attention as A
from prism_kernels.hf.matched_summary import matched_summary

ROOT = Path(__file__).resolve().parents[2]
MODES = ("rows", "mass", "value", "both", "mass2")


def _segment_terms(q, kp, vp, seg_of, m, s, km, vm, b, mode, q0=None):
    """Scores [Bg, H, nq, m] and outputs of one remote partition's segments for the
    receiver's queries q [Bg, H, nq, d]; kp / vp [Bg, H, n, d]; km / vm [Bg, H, m, d],
    b [Bg, H, m]; q0 [Bg, H, 1, d] the query the rows are matched at (mass2 only).
    Output: [Bg, H, m, d] (one per segment) or [Bg, H, nq, m, d] (per query)."""
    row_score = s * q @ km.transpose(-1, -2) + b.unsqueeze(2)
    if mode == "rows":
        return row_score, vm
    if mode.startswith("shift"):
        return row_score + float(mode[5:]), vm
    onehot = torch.nn.functional.one_hot(seg_of, m).to(q.dtype)          # [Bg, n, m]
    neg = torch.where(onehot > 0, 0.0, float("-inf"))[:, None, None]    # [Bg, 1, 1, n, m]
    if mode == "mass2":
        # the q0-weighted key covariance C of each segment (per head): the Hessian of L_S at q0 / s^2
        w = torch.softmax((s * q0 @ kp.transpose(-1, -2)).unsqueeze(-1) + neg, dim=-2)[:, :, 0]   # [Bg, H, n, m]
        dev_k = kp.unsqueeze(2) - km.unsqueeze(3)                                                 # [Bg, H, m, n, d]
        C = torch.einsum("bhnm,bhmnd,bhmne->bhmde", w, dev_k, dev_k)
        dq = q - q0
        return row_score + 0.5 * s * s * torch.einsum("bhqd,bhmde,bhqe->bhqm", dq, C, dq), vm
    S = s * q @ kp.transpose(-1, -2)                                      # [Bg, H, nq, n]
    L = torch.logsumexp(S.unsqueeze(-1) + neg, dim=-2)                   # [Bg, H, nq, m]
    if mode in ("value", "both"):
        W = torch.exp(S - torch.gather(L, 3, seg_of[:, None, None, :].expand_as(S)))
        per_q = torch.einsum("bhqt,btm,bhtd->bhqmd", W, onehot, vp)
        return (row_score if mode == "value" else L), per_q
    assert mode == "mass", mode
    return L, vm


def oracle_simulate(mode):
    def simulate(query, key, value, *, config, causal, scale=None, key_valid=None, averaging=None,
                 module=None, layout=None, plans=None, roles=None, capture=None):
        assert not causal and capture is None, "oracle_bounds: encoders only"
        B, H, N, d = query.shape
        assert key.shape[1] == H, "oracle_bounds: multi-head attention only"
        lay = layout or A.build_layout(key_valid, B, N, config, causal, query.device, roles)
        s = scale if scale is not None else d ** -0.5
        q3 = query.transpose(1, 2).reshape(B, N, H * d)
        k3 = key.transpose(1, 2).reshape(B, N, H * d)
        v3 = value.transpose(1, 2).reshape(B, N, H * d)
        heads = lambda t: t.view(t.shape[0], t.shape[1], H, d).transpose(1, 2)
        out = query.new_zeros(B, N, H, d)
        for g in lay.groups:
            assert g.span is not None, "oracle_bounds: same-length batches only"
            b0, b1, s0 = g.span
            q_first = g.take(q3, g.plan.partitions[0])[:, :1]
            rows = {}
            for part in g.plan.partitions:
                kp, vp = g.take(k3, part), g.take(v3, part)
                seg_of, cnt = dyn.partition_segments(config, kp, part, g.fixed(part), g.grid)
                km, vm, b = matched_summary(q_first, kp, vp, seg_of, cnt, H, s, 1.0, False)
                rows[part.index] = (heads(kp), heads(vp), seg_of, cnt.shape[1], heads(km.to(kp.dtype)),
                                    heads(vm.to(vp.dtype)), b.transpose(1, 2).to(kp.dtype))
            qf = heads(q_first)                                          # [Bg, H, 1, d]
            for dev in g.plan.devices:
                part = g.plan.partitions[dev.index]
                q = heads(g.take(q3, part))
                kp, vp = rows[dev.index][:2]
                scores, outs = [s * q @ kp.transpose(-1, -2)], [vp]
                for j in dev.sources:
                    kj, vj, seg_of, m, km, vm, b = rows[j]
                    sc, val = _segment_terms(q, kj, vj, seg_of, m, s, km, vm, b, mode, q0=qf)
                    scores.append(sc)
                    outs.append(val)
                p = torch.softmax(torch.cat(scores, -1), -1)
                o, at = p[..., :kp.shape[2]] @ vp, kp.shape[2]
                for val, sc in zip(outs[1:], scores[1:]):
                    pj = p[..., at:at + sc.shape[-1]]
                    at += sc.shape[-1]
                    o = o + (pj @ val if val.dim() == 4 else torch.einsum("bhqm,bhqmd->bhqd", pj, val))
                out[b0:b1, s0 + part.offset:s0 + part.offset + part.size] = o.transpose(1, 2)
        return out
    return simulate


def _mode(text: str) -> str:
    if text in MODES:
        return text
    try:
        if text.startswith(("shift+", "shift-")):
            float(text[5:])
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(MODES)} or shift+X / shift-X")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="dinov2-digits", choices=("dinov2-fashion", "dinov2-digits"))
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--cr", type=float, default=9.9)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--modes", nargs="+", default=list(MODES), type=_mode,
                    help=f"{' '.join(MODES)} or shift+X / shift-X")
    ap.add_argument("--limit", type=int, default=None, help="test images (as prism eval --limit)")
    ap.add_argument("--n-train", type=int, default=None, help="training images of the probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "oracle_bounds")
    ap.add_argument("--tag", default="", help="added to the file names (e.g. shift)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    stem = args.out / (f"oracle_{args.task}_{args.image_size}px_P{args.partitions}"
                       + (f"_n{args.limit}" if args.limit else "") + (f"_{args.tag}" if args.tag else ""))
    if args.report_only:
        d = json.loads(stem.with_suffix(".json").read_text())
        write_report(stem, d)
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = get_task(args.task, limit=args.limit, seed=args.seed, image_size=args.image_size,
                    n_train=args.n_train, progress=False)
    task.setup()
    split, probe = task.split, task.probe
    x_test, y_test = split.x_test, split.y_test
    te_exact = task.test_exact.astype(np.float64)
    exact_hits = task.exact_hits["accuracy"]

    cell = Cell("prism", p=args.partitions, cr=args.cr, averaging="attention_input")   # the defaults
    results = {}
    original, pkg = A.simulate_prism, None
    for name in ("package",) + tuple(args.modes):
        t1 = time.time()
        A.simulate_prism = original if name == "package" else oracle_simulate(name)
        try:
            te = task.features(x_test, cell, name).astype(np.float64)
        finally:
            A.simulate_prism = original
        hits = probe.predict(te) == y_test
        results[name] = {"hits": hits.astype(int).tolist(), "cosine": cosine_to_reference(te, te_exact).tolist(),
                         "seconds": round(time.time() - t1)}
        if name == "rows":      # this script's default row against the package's: same features
            results[name]["max_rel_diff_to_package"] = float(np.abs(te - pkg).max() / np.abs(pkg).max())
        if name == "package":
            pkg = te
        print(name, f"{100 * hits.mean():.1f} %", f"cos {np.mean(results[name]['cosine']):.4f}",
              f"{results[name]['seconds']} s", flush=True)
    d = {"args": {k: str(v) for k, v in vars(args).items()}, "exact_accuracy": float(exact_hits.mean()),
         "exact_hits": exact_hits.astype(int).tolist(), "n_train": len(split.y_train), "n_test": len(y_test),
         "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": round(time.time() - t0),
         "machine": _machine(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(stem, d)


def _machine() -> str:
    """CPU model and torch build: the CPU's rounding can move an item across the probe's boundary."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(stem: Path, d: dict) -> None:
    a, results = d["args"], d["results"]
    ex = np.array(d["exact_hits"])
    base = np.array(results["package"]["hits"])
    lines = [f"# One row per segment: what its mass and its value cost ({a['task']}, {a['image_size']} px, "
             f"P = {a['partitions']}, CR {float(a['cr']):g})\n",
             f"DINOv2-S, the package's default segments and anchors, exact model's probe (no refit), seed "
             f"{a['seed']}, {d['n_train']} training / {d['n_test']} test images. Exact probe accuracy "
             f"{100 * ex.mean():.1f} %. Δ: paired bootstrap 95 % intervals on the same test items. Written by "
             f"benchmarks/accuracy/oracle_bounds.py, {d['date_utc']} UTC, {d['seconds']} s"
             + (f", {d['machine']}" if "machine" in d else "") + ".\n",
             "| summary of a segment | probe accuracy (%) | Δ to exact | Δ to the default | cosine to exact | Δ cosine to the default |",
             "|---|---|---|---|---|---|"]
    label = {"package": "the package's default (rows matched at [CLS])", "rows": "rows: this script's default row",
             "mass": "mass: exact per-query mass, the row's value", "value": "value: the row's score, exact per-query value",
             "both": "both exact (= exact attention; a check)", "mass2": "mass2: the row's score + the second-order term"}
    for name, r in results.items():
        h = np.array(r["hits"])
        lo, hi = wilson_interval(int(h.sum()), len(h))
        c, clo, chi = t_interval(r["cosine"])
        pe = paired_bootstrap_diff(h, ex)
        cells = [f"{100 * h.mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", f"{100 * pe[0]:+.1f} [{100 * pe[1]:+.1f}, {100 * pe[2]:+.1f}]"]
        if name == "package":
            cells += ["", f"{c:.4f} [{clo:.4f}, {chi:.4f}]", ""]
        else:
            pb = paired_bootstrap_diff(h, base)
            cb = paired_bootstrap_diff(r["cosine"], results["package"]["cosine"])
            cells += [f"{100 * pb[0]:+.1f} [{100 * pb[1]:+.1f}, {100 * pb[2]:+.1f}]", f"{c:.4f} [{clo:.4f}, {chi:.4f}]",
                      f"{cb[0]:+.4f} [{cb[1]:+.4f}, {cb[2]:+.4f}]"]
        lab = label.get(name) or f"{name}: the row's score {name[5:]}, the row's value"
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if "rows" in results and "max_rel_diff_to_package" in results["rows"]:
        lines.append(f"\nThis script's default row against the package's: largest feature difference "
                     f"{results['rows']['max_rel_diff_to_package']:.1e} of the largest feature.")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(d))
    print(text)


if __name__ == "__main__":
    main()

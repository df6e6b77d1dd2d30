"""Tables (Markdown) and plots (metric against CR, the paper's Fig. 4) from a
task's result store."""
from __future__ import annotations

import math
from pathlib import Path

METRIC_LABELS = {
    "accuracy": "probe accuracy", "knn_accuracy": "k-NN accuracy", "macro_f1": "macro F1",
    "cosine_mean": "cosine to exact", "bpc": "bits per character", "next_word_accuracy": "next-word accuracy",
    "token_ppl": "token perplexity",
}
PERCENT = ("accuracy", "knn_accuracy", "macro_f1", "next_word_accuracy")
EXACT_KEY = "exact|P=1|CR=-|avg=-"


# result files written before the rename of the paper's averaging keep "block_output"
OLD_NAMES = {"block_output": "block_input"}


def _fmt(v, metric):
    if v is None:
        return ""
    if metric in PERCENT:
        return f"{100 * v:.2f}"
    if metric in ("cosine_mean", "cosine_min"):
        return f"{v:.4f}"
    if metric in ("bpc",):
        return f"{v:.4f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fmt_ci(ci, metric, signed=False) -> str:
    """' [lo, hi]' in the metric's unit; '' for results stored without intervals."""
    if not ci:
        return ""
    scale, digits = (100, 2) if metric in PERCENT else (1, 4)
    sign = "+" if signed else ""
    return " [" + ", ".join(f"{scale * x:{sign}.{digits}f}" for x in ci) + "]"


def _parse(key: str) -> dict:
    """A cell key -> its fields. Keys without an 'opt' part (all results stored
    before variants existed) parse as the package-default variant."""
    parts = key.split("|")
    out = {"method": parts[0], "opt": ""}
    for p in parts[1:]:
        k, v = p.split("=", 1)
        out[k] = v
    out["P"] = int(out["P"])
    out["CR"] = None if out["CR"] == "-" else float(out["CR"])
    out["avg"] = None if out["avg"] == "-" else OLD_NAMES.get(out["avg"], out["avg"])
    return out


def rows(cells: dict) -> list[dict]:
    order = {"exact": 0, "voltage": 1, "prism": 2}
    rs = [{**_parse(k), "res": v} for k, v in cells.items()]
    rs.sort(key=lambda r: (r["P"] if r["method"] != "exact" else 0, order[r["method"]],
                           r["opt"], r["avg"] or "", r["CR"] or 0))
    return rs


def metrics_of(meta: dict) -> list[str]:
    if meta.get("primary") == "bpc":
        return ["bpc", "next_word_accuracy", "token_ppl"]
    return ["accuracy", "knn_accuracy", "macro_f1", "cosine_mean"]


def diff_metrics_of(meta: dict) -> list[str]:
    """The metrics whose difference to exact gets a column (with its paired interval)."""
    return ["bpc", "next_word_accuracy"] if meta.get("primary") == "bpc" else ["accuracy", "knn_accuracy"]


def _diff(res: dict, exact: dict, m: str) -> str:
    if m in res and f"{m}_diff" in res:
        d, ci = res[f"{m}_diff"], res.get(f"{m}_diff_ci")
    elif m in res and m in exact:
        d, ci = res[m] - exact[m], None          # stored before paired intervals existed
    else:
        return ""
    scale, digits = (100, 2) if m in PERCENT else (1, 4)
    return f"{scale * d:+.{digits}f}" + _fmt_ci(ci, m, signed=True)


def markdown_table(meta: dict, cells: dict) -> str:
    ms, ds = metrics_of(meta), diff_metrics_of(meta)
    exact = cells.get(EXACT_KEY)
    rs = rows(cells)
    variants = any(r["opt"] for r in rs)
    head = ["method", "P", "averaging"] + (["variant"] if variants else []) + ["CR", "eff. CR"]
    head += [METRIC_LABELS[m] + (" (%)" if m in PERCENT else "") for m in ms]
    if exact:
        head += [f"Δ {METRIC_LABELS[m]}" for m in ds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        res = r["res"]
        line = [r["method"], str(r["P"]), r["avg"] or ""] + ([r["opt"] or "default"] if variants and
                                                            r["method"] == "prism" else [""] if variants else [])
        line += ["" if r["CR"] is None else f"{r['CR']:g}",
                 "" if "effective_cr" not in res else f"{res['effective_cr']:.2f}"]
        line += [_fmt(res.get(m), m) + (_fmt_ci(res.get(f"{m}_ci"), m) if m in res else "") for m in ms]
        if exact:
            line += ["" if r["method"] == "exact" else _diff(res, exact, m) for m in ds]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def describe_meta(meta: dict) -> str:
    skip = {"task", "higher_is_better", "primary"}
    return ", ".join(f"{k}={v}" for k, v in meta.items() if k not in skip and v is not None)


INTERVALS = {
    False: "[lo, hi]: 95 % intervals. Accuracies: Wilson score interval over the test items; cosine: "
           "Student-t interval of the mean; Δ = method - exact on the same test items, with the paired "
           "bootstrap interval (items resampled, fixed seed): an interval that excludes 0 is a loss (or "
           "gain) that is not sampling noise. k-NN: cosine k-nearest neighbours on the exact model's "
           "training features (k by cross-validation on the training split).",
    True: "[lo, hi]: 95 % intervals. Bits per character: percentile bootstrap over the text windows "
          "(independent sequences; fixed seed); next-word accuracy: Wilson interval over the scored words "
          "(optimistic: words of one window are not independent); Δ = method - exact on the same windows, "
          "with the paired window bootstrap interval.",
}


def write_report(store, out_dir, task_name: str) -> tuple[Path, Path | None]:
    out_dir = Path(out_dir)
    meta, cells = store.meta, store.cells()
    md = [f"# Accuracy under Prism: `{task_name}`", "",
          f"Model: {meta.get('model')}. Data: {meta.get('dataset')}.", "",
          f"Settings: {describe_meta(meta)}.", "",
          "exact = the stock model on one device; voltage = P devices exchanging full hidden states "
          "(run as Prism with one mean per token, CR = 1); prism = segment means at the nominal "
          "compression rate CR (m_j = ceil(n_j / CR), Eq. 16); eff. CR = Voltage / Prism tokens "
          "received per device per layer, averaged over devices and test sequences. "
          + INTERVALS[meta.get("primary") == "bpc"], "",
          markdown_table(meta, cells), ""]
    png = None
    try:
        png = plot(meta, cells, out_dir / f"accuracy_{task_name}.png", task_name)
        md += [f"![{task_name}](accuracy_{task_name}.png)", ""]
    except Exception as e:  # plotting is optional
        md += [f"(plot failed: {e})", ""]
    path = out_dir / f"accuracy_{task_name}.md"
    path.write_text("\n".join(md))
    return path, png


def plot(meta: dict, cells: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    ms = ["bpc", "next_word_accuracy"] if meta.get("primary") == "bpc" else ["accuracy", "cosine_mean"]
    rs = rows(cells)
    exact = cells.get(EXACT_KEY)
    fig, axes = plt.subplots(1, len(ms), figsize=(5.2 * len(ms), 3.8))
    styles = {"block_input": "-", "attention_input": "--"}
    colors = {2: "tab:blue", 3: "tab:orange", 4: "tab:green"}
    for ax, m in zip(axes, ms):
        scale = 100 if m in ("accuracy", "macro_f1", "next_word_accuracy") else 1
        for p in sorted({r["P"] for r in rs if r["method"] != "exact"}):
            volt = [r for r in rs if r["method"] == "voltage" and r["P"] == p]
            lines = sorted({(r["avg"], r["opt"]) for r in rs if r["method"] == "prism" and r["P"] == p})
            for avg, opt in lines:
                pts = [(1.0, volt[0]["res"][m])] if volt else []
                pts += [(r["CR"], r["res"][m]) for r in rs if r["method"] == "prism" and r["P"] == p
                        and r["avg"] == avg and r["opt"] == opt and m in r["res"]]
                if len(pts) < 2:
                    continue
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, [scale * y for y in ys], styles.get(avg, "-."), marker="o", ms=3,
                        color=colors.get(p, None), alpha=1.0 if not opt else 0.6,
                        label=f"Prism P={p}, {avg}" + (f", {opt}" if opt else ""))
        if exact:
            ax.axhline(scale * exact[m], color="k", lw=1, ls=":", label="exact / Voltage")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("compression rate CR (CR = 1: Voltage)")
        ax.set_ylabel(METRIC_LABELS[m] + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    n = (f"n_test={meta['n_test']}" if meta.get("n_test") else
         f"{meta['scored_chars']} chars" if meta.get("scored_chars") else "")
    fig.suptitle(f"{title}: {meta.get('model', '')}" + (f" ({n}, seed {meta.get('seed', 0)})" if n else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

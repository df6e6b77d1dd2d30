"""Where the rows are matched: the query variants of benchmarks/results/accuracy_matched_cls/,
each paired with the log-count bias and the mean-query rows (`count_bias=matched`) stored
in benchmarks/results/accuracy_matched/ for the same task, P and items (seed 0).

The variants were run with benchmarks/accuracy/matched_query_variants.patch applied (an
environment variable PRISM_EXP_MATCH picks the query each partition's rows are matched at):
  cls_all        every partition at the first token's ([CLS]) query: what the package's
                 count_bias="matched_cls" does (the default for vision encoders)
  cls_other      partition 0 the paper's row (gamma 0), the others at the [CLS] query
  cls_mix        every partition at the mean of the [CLS] query and its own mean query
  cls_half       every partition at half the [CLS] query (count_bias=matched_half)
  local_sink     partition 0 at the [CLS] query, the others at the query of their token
                 with the largest key (no message needed)
  mean_other     partition 0 at the [CLS] query, the others at their own mean query

Usage: python benchmarks/accuracy/query_variants.py   (prints a markdown table)
"""
import glob
import json
import os

import numpy as np

from prism_kernels.eval.metrics import paired_bootstrap_diff

ROOT = os.path.join(os.path.dirname(__file__), "..", "results")
ORDER = ["cls_all", "cls_half", "cls_mix", "cls_other", "local_sink", "mean_other"]


def _hits(c):
    return np.array([ch == "1" for ch in c["item_hits"]], dtype=float)


def _fmt(d, lo, hi, scale=100.0, digits=1):
    return f"{scale * d:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def main():
    print("| variant | task | probe accuracy | Δ to exact | − log-count bias | − mean query (matched) "
          "| cosine − log-count bias | cosine − mean query |")
    print("|---|---|---|---|---|---|---|---|")
    for exp in ORDER:
        for f in sorted(glob.glob(os.path.join(ROOT, "accuracy_matched_cls", exp, "*", "accuracy_*.json"))):
            tag = f.split(os.sep)[-2]
            cells = json.load(open(f))["cells"]
            base = json.load(open(glob.glob(os.path.join(ROOT, "accuracy_matched", tag, "accuracy_*.json"))[0]))["cells"]
            for k, c in cells.items():
                if not k.startswith("prism"):
                    continue
                head = "|".join(k.split("|")[:4])
                log = base[head + "|opt=count_bias=log"]
                mean = base[head + "|opt=count_bias=matched"]
                exact = base["exact|P=1|CR=-|avg=-"]
                a = _hits(c)
                print(f"| {exp} | {tag} ({c['n_test']}) | {100 * c['accuracy']:.1f} "
                      f"| {_fmt(*paired_bootstrap_diff(a, _hits(exact)))} "
                      f"| {_fmt(*paired_bootstrap_diff(a, _hits(log)))} "
                      f"| {_fmt(*paired_bootstrap_diff(a, _hits(mean)))} "
                      f"| {_fmt(*paired_bootstrap_diff(c['item_cosine'], log['item_cosine']), scale=1.0, digits=4)} "
                      f"| {_fmt(*paired_bootstrap_diff(c['item_cosine'], mean['item_cosine']), scale=1.0, digits=4)} |")


if __name__ == "__main__":
    main()

"""Metrics: classification accuracy, macro F1, embedding cosine, bits per character
and next-word accuracy."""
from __future__ import annotations

import math

import numpy as np
import torch


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty set")
    return float((y_true == y_pred).mean())


def macro_f1(y_true, y_pred, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in np.unique(y_true):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def cosine_to_reference(x, ref) -> np.ndarray:
    """Row-wise cosine similarity between two [n, D] arrays."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(x, ref, dim=-1).numpy()


def bits_per_character(total_nll_nats: float, n_chars: int) -> float:
    """Summed next-token negative log-likelihood (nats) over a text -> bits per
    character of that text (the text8/enwik8 measure, tokenizer-independent)."""
    if n_chars <= 0:
        raise ValueError("n_chars must be positive")
    return total_nll_nats / math.log(2) / n_chars


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (nats) of ids[1:] under logits[:-1]; logits [T, V], ids [T]."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(-1, ids[1:, None]).squeeze(-1)


def next_word_hits(logits: torch.Tensor, ids: torch.Tensor, word_starts) -> tuple[int, int]:
    """Greedy next-word accuracy under teacher forcing.

    A word spans tokens [s, e) (`word_starts` lists every word's first-token
    index, in order; a word ends where the next one starts or at the end). It
    counts as predicted when the argmax at every position s-1 .. e-2 equals the
    actual token, i.e. greedy decoding from the true prefix would write the whole
    word. Words starting at token 0 (no prefix) and the last, possibly cut, word
    are not scored. Returns (hits, scored).
    """
    pred = logits.argmax(-1)
    starts = [s for s in word_starts if s > 0]
    hits = scored = 0
    for s, e in zip(starts[:-1], starts[1:]):
        scored += 1
        hits += int(bool((pred[s - 1:e - 1] == ids[s:e]).all()))
    return hits, scored


# ------------------------------------------------------------------ confidence intervals
#
# Every interval is a 95 % interval (z = 1.96). Bootstraps use a fixed seed so a
# re-run of the same cell reproduces its interval exactly.

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n. Unlike the
    normal approximation it stays inside [0, 1] and is sensible at 0 % and 100 %."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _boot_indices(n: int, samples: int, seed: int) -> np.ndarray:
    if n <= 0:
        raise ValueError("bootstrap of an empty set")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def paired_bootstrap_diff(a, b, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same items and the percentile 95 % interval of that
    mean from resampling *items* (both arrays with the same indices, so the
    correlation between the two methods on one item is kept: that is what makes
    a small difference detectable). Returns (diff, lo, hi)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap_diff: need two 1-D arrays of one length, got {a.shape} and {b.shape}")
    d = a - b
    means = d[_boot_indices(len(d), samples, seed)].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def ratio_bootstrap(num, den, ref_num=None, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """Percentile bootstrap of sum(num) / sum(den) over independent units (text
    windows: num = a window's NLL in bits, den = its characters). With `ref_num`
    (the exact model's NLL on the same windows) also the paired interval of the
    difference of the two ratios, resampling the same windows for both.
    Returns {"value", "ci", and with ref_num "diff", "diff_ci"}."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"ratio_bootstrap: need two 1-D arrays of one length, got {num.shape} and {den.shape}")
    idx = _boot_indices(len(num), samples, seed)
    dsum = den[idx].sum(1)
    r = num[idx].sum(1) / dsum
    out = {"value": float(num.sum() / den.sum()), "ci": [float(x) for x in np.percentile(r, [2.5, 97.5])]}
    if ref_num is not None:
        ref = np.asarray(ref_num, dtype=np.float64)
        if ref.shape != num.shape:
            raise ValueError(f"ratio_bootstrap: ref_num has shape {ref.shape}, num {num.shape}")
        dr = r - ref[idx].sum(1) / dsum
        out["diff"] = float((num.sum() - ref.sum()) / den.sum())
        out["diff_ci"] = [float(x) for x in np.percentile(dr, [2.5, 97.5])]
    return out


def t_interval(values) -> tuple[float, float, float]:
    """Mean and Student-t 95 % interval of the mean of independent values
    (per-item cosines). Returns (mean, lo, hi); a single value gives (v, v, v)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("t_interval of an empty set")
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def accuracy_with_ci(correct, ref_correct=None, name: str = "accuracy", seed: int = 0) -> dict:
    """{name, name_ci (Wilson)} from a 0/1 array of per-item hits; with the exact
    model's hits on the same items also name_diff and name_diff_ci (paired
    bootstrap of Prism - exact)."""
    c = np.asarray(correct, dtype=np.int64)
    out = {name: float(c.mean()), f"{name}_ci": list(wilson_interval(int(c.sum()), len(c)))}
    if ref_correct is not None:
        d, lo, hi = paired_bootstrap_diff(c, np.asarray(ref_correct, dtype=np.int64), seed=seed)
        out[f"{name}_diff"], out[f"{name}_diff_ci"] = d, [lo, hi]
    return out

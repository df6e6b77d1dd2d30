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

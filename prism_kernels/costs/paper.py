"""The paper's cost figures (Tables IV-VI), as independent expected values.

Each row: the setting (model, N, P, means per partition m or nominal CR) and the
paper's numbers: GFLOPs total and per device, computation speed-up %, PDPLC
(tokens received per device per layer), CR and communication speed-up %.
None where the paper's table gives no figure. For Prism rows of ViT/BERT the
paper gives PDPLC = (P - 1) m; m = PDPLC / (P - 1). GPT-2 rows give a nominal
CR; m follows from Eq. 16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PaperRow:
    table: str
    model: str
    seq_len: int
    strategy: str                 # "single" | "voltage" | "prism"
    num_partitions: int
    num_means: Optional[int]      # m per partition (ViT, BERT Prism rows)
    cr: Optional[float]           # the CR column (nominal for GPT-2)
    gflops_total: float
    gflops_per_device: float
    comp_speedup_pct: Optional[float]
    pdplc: Optional[int]
    comm_speedup_pct: Optional[float]


def _rows():
    rows = []
    V, B, G = "IV", "V", "VI"
    # Table IV: ViT-B/16, 224x224 -> N = 197
    rows.append(PaperRow(V, "vit-b16", 197, "single", 1, None, None, 35.15, 35.15, None, None, None))
    rows.append(PaperRow(V, "vit-b16", 197, "voltage", 2, None, None, 40.74, 20.37, 42.05, 99, None))
    rows.append(PaperRow(V, "vit-b16", 197, "voltage", 3, None, None, 46.33, 15.44, 56.06, 131, None))
    for p, pdplc, cr, tot, dev, comp, comm in (
            (2, 10, 9.90, 35.07, 17.54, 50.11, 89.90), (2, 20, 4.95, 35.71, 17.86, 49.20, 79.80),
            (2, 30, 3.30, 36.35, 18.18, 48.29, 69.70), (3, 20, 6.55, 36.04, 12.01, 65.82, 84.73),
            (3, 40, 3.28, 37.89, 12.63, 64.07, 69.47), (3, 60, 2.18, 39.73, 13.24, 62.32, 54.20)):
        rows.append(PaperRow(V, "vit-b16", 197, "prism", p, pdplc // (p - 1), cr, tot, dev, comp, pdplc, comm))
    # Table V: BERT-base, N = 256
    rows.append(PaperRow(B, "bert-base", 256, "single", 1, None, None, 45.93, 45.93, None, None, None))
    rows.append(PaperRow(B, "bert-base", 256, "voltage", 2, None, None, 53.18, 26.59, 42.11, 128, None))
    rows.append(PaperRow(B, "bert-base", 256, "voltage", 3, None, None, 60.42, 20.14, 56.15, 171, None))
    for p, pdplc, cr, tot, dev, comp, comm in (
            (2, 13, 9.85, 45.58, 22.79, 50.38, 89.84), (2, 1, 128.0, 44.79, 22.40, 51.24, 99.22),
            (3, 18, 9.50, 46.02, 15.34, 66.60, 89.47), (3, 2, 85.50, 44.51, 14.84, 67.70, 98.83)):
        rows.append(PaperRow(B, "bert-base", 256, "prism", p, pdplc // (p - 1), cr, tot, dev, comp, pdplc, comm))
    # Table VI: GPT-2 small with LM head, N = 256 (no PDPLC column)
    rows.append(PaperRow(G, "gpt2", 256, "single", 1, None, None, 65.71, 65.71, None, None, None))
    rows.append(PaperRow(G, "gpt2", 256, "voltage", 2, None, None, 72.97, 36.49, 44.48, None, None))
    rows.append(PaperRow(G, "gpt2", 256, "voltage", 3, None, None, 80.23, 26.74, 59.30, None, None))
    p2 = ((68.71, 34.36, 47.72, 50.00), (67.26, 33.63, 48.82, 66.67), (66.60, 33.30, 49.32, 75.00),
          (66.13, 33.07, 49.68, 80.00), (65.87, 32.94, 49.88, 83.33), (65.67, 32.84, 50.03, 85.71),
          (65.54, 32.77, 50.13, 87.50), (65.41, 32.71, 50.23, 88.89), (65.27, 32.64, 50.33, 90.00))
    p3 = ((72.02, 24.01, 63.47, 50.00), (69.37, 23.12, 64.81, 66.67), (68.05, 22.68, 65.48, 75.00),
          (67.29, 22.43, 65.87, 80.00), (66.72, 22.24, 66.15, 83.33), (66.35, 22.12, 66.34, 85.71),
          (65.97, 21.99, 66.53, 87.50), (65.78, 21.93, 66.63, 88.89), (65.59, 21.86, 66.73, 90.00))
    for p, table in ((2, p2), (3, p3)):
        for cr, (tot, dev, comp, comm) in zip(range(2, 11), table):
            rows.append(PaperRow(G, "gpt2", 256, "prism", p, None, float(cr), tot, dev, comp, None, comm))
    return tuple(rows)


PAPER_ROWS = _rows()

# The three headline settings (ViT-B/16, BERT-base, GPT-2; what `prism costs --paper` prints).
HEADLINE_SETTINGS = (
    dict(model="vit-b16", seq_len=197, num_partitions=2, num_means=10),
    dict(model="bert-base", seq_len=256, num_partitions=2, num_means=1),
    dict(model="gpt2", seq_len=256, num_partitions=2, compression_rate=10.0),
)


def paper_row(model: str, strategy: str, num_partitions: int, *, num_means=None, cr=None) -> PaperRow:
    """The paper's row for a setting (KeyError if the paper has none)."""
    for r in PAPER_ROWS:
        if (r.model, r.strategy, r.num_partitions) != (model, strategy, num_partitions):
            continue
        if strategy != "prism" or (num_means is not None and r.num_means == num_means) or \
                (cr is not None and r.num_means is None and r.cr == cr):
            return r
    raise KeyError((model, strategy, num_partitions, num_means, cr))


@dataclass(frozen=True)
class Comparison:
    setting: str
    metric: str
    ours: float
    paper: float

    @property
    def diff_pct(self) -> float:
        return 100.0 * (self.ours - self.paper) / self.paper


def headline_comparison():
    """Our figures next to the paper's for the three headline settings."""
    from .report import estimate
    out = []
    for s in HEADLINE_SETTINGS:
        r = estimate(**s, anchors="none")     # the paper's plain means
        model, p = s["model"], s["num_partitions"]
        m, cr = s.get("num_means"), s.get("compression_rate")
        name = f"{model} N={r.seq_len}"
        prism_label = f"Prism P={p} " + (f"m={m}" if m is not None else f"CR={cr:g}")
        single = paper_row(model, "single", 1)
        out.append(Comparison(name, "single GFLOPs", r.single_gflops, single.gflops_per_device))
        out.append(Comparison(name, f"Voltage P={p} GFLOPs/device", r.voltage_gflops_per_device,
                              paper_row(model, "voltage", p).gflops_per_device))
        if model != "bert-base":      # the headline figures quote Voltage P=3 for ViT and GPT-2
            r3 = estimate(model, r.seq_len, 3, num_means=1, anchors="none")
            out.append(Comparison(name, "Voltage P=3 GFLOPs/device", r3.voltage_gflops_per_device,
                                  paper_row(model, "voltage", 3).gflops_per_device))
        pr = paper_row(model, "prism", p, num_means=m, cr=cr)
        out.append(Comparison(name, f"{prism_label} GFLOPs/device", r.prism_gflops_per_device,
                              pr.gflops_per_device))
        out.append(Comparison(name, f"{prism_label} CR", r.compression_rate, pr.cr))
        out.append(Comparison(name, f"{prism_label} comm speed-up %", r.comm_speedup_pct, pr.comm_speedup_pct))
        out.append(Comparison(name, f"{prism_label} comp speed-up %", r.comp_speedup_pct, pr.comp_speedup_pct))
    return out


def format_comparison(rows) -> str:
    cols = ("setting", "figure", "ours", "paper", "diff")
    cells = [(c.setting, c.metric, f"{c.ours:.2f}", f"{c.paper:.2f}", f"{c.diff_pct:+.2f}%") for c in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(cols)]
    line = lambda r: "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), line(tuple("-" * w for w in widths))] + [line(r) for r in cells])

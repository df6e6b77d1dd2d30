"""Eager vs torch.compile of a Prism-enabled Hugging Face model (CPU, 1 thread).

A BERT-base-sized random model (12 layers, hidden 768, 12 heads), batch 8 x 128
tokens without padding, Prism P=2 CR=8. Compiled: torch.compile(model,
fullgraph=True), default mode. After warm-up (compilation included there), the
eager and compiled forwards run interleaved; medians are reported. Outputs are
checked against eager and a recompilation is an error (every timed call uses
new token ids of the same shape).

    PYTHONPATH=. python benchmarks/bench_hf_compile.py [--reps 9] [--out benchmarks/results/hf_compile.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().strip()
    except OSError:
        return "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--freezing", action="store_true",
                    help="torch._inductor.config.freezing = True (weights as constants, prepacked GEMMs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    if args.freezing:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    from transformers import BertConfig, BertModel

    import prism_kernels.hf as phf

    load_before = loadavg()
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
                                 intermediate_size=3072)).eval()
    phf.enable_prism(model, num_partitions=2, compression_rate=8.0)
    compiled = torch.compile(model, fullgraph=True)
    B, N, V = args.batch, args.tokens, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    new_ids = lambda: torch.randint(1, V, (B, N), generator=gen)

    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(input_ids=new_ids())
        compile_s = time.perf_counter() - t0
        torch._dynamo.config.error_on_recompile = True
        max_err = 0.0
        for _ in range(args.warmup):
            ids = new_ids()
            e = model(input_ids=ids).last_hidden_state
            c = compiled(input_ids=ids).last_hidden_state
            max_err = max(max_err, (e - c).abs().max().item())
        eager, comp = [], []
        for i in range(args.reps):
            ids = new_ids()
            order = [(model, eager), (compiled, comp)]
            for fn, acc in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                fn(input_ids=ids)
                acc.append(time.perf_counter() - t)
    load_after = loadavg()
    me, mc = statistics.median(eager), statistics.median(comp)
    lines = [
        "# Eager vs torch.compile, Prism-enabled BERT-base-sized model (CPU)",
        "",
        f"Produced by `benchmarks/bench_hf_compile.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.",
        "",
        f"* machine: {cpu_model()}, {torch.get_num_threads()} thread (of {__import__('os').cpu_count()} CPUs); "
        f"torch {torch.__version__}",
        f"* load (/proc/loadavg) before: `{load_before}`, after: `{load_after}`",
        f"* model: random BertModel, {args.layers} layers, hidden 768, 12 heads; input {B} x {N} tokens, "
        "no padding (attention_mask=None)",
        "* Prism: P=2, CR=8 (attention_input averaging, backend auto)",
        "* compiled: `torch.compile(model, fullgraph=True)`, default mode"
        + (" with `torch._inductor.config.freezing = True`" if args.freezing else "")
        + "; first call (compilation) "
        f"{compile_s:.1f} s; no recompilation over {1 + args.warmup + args.reps} calls with new token ids "
        "(`error_on_recompile`)",
        f"* max |eager - compiled| over the warm-up outputs: {max_err:.2e}",
        f"* timing: {args.warmup} warm-up pairs, then {args.reps} interleaved pairs (order alternating); medians",
        "",
        "| | median s / forward | min | max |",
        "|---|---|---|---|",
        f"| eager | {me:.4f} | {min(eager):.4f} | {max(eager):.4f} |",
        f"| compiled | {mc:.4f} | {min(comp):.4f} | {max(comp):.4f} |",
        "",
        f"compiled / eager speed: **{me / mc:.2f}x** (>1: compiled faster)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Decode tokens/s of SmolLM2-135M: Prism decoding (the last device's compressed cache)
against stock `generate` with the full cache.

One 1024-token prompt (prompt 0 of bench_generation.py), 64 new tokens, greedy
(`min_new_tokens=64` so EOS never stops a run early), batch 1, fp32. Every run is one
`model.generate` call; a LogitsProcessor stamps the time at each step, so the decode
time is that of new tokens 2..64 (63 forwards of one token), without the prefill.
Runs of the variants are interleaved (stock, prism, ... in turn) for `--repeats`
rounds; the median per variant is reported. Stock runs with the attention the model
was loaded with ("eager") and with "sdpa" (transformers' default).

    PYTHONPATH=. python benchmarks/generation/bench_decode_speed.py --threads 1 --repeats 5 \
        --out benchmarks/results/generation_speed.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import prism_kernels.hf as phf  # noqa: E402
from prism_kernels.eval import models as Mo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import NEW, prompts, split  # noqa: E402


class Stamp(LogitsProcessor):
    def __init__(self):
        self.t, self.c = [], []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        self.c.append(time.process_time())
        return scores


def variants(P, cr):
    return {
        "stock (eager)": ("eager", None),
        "stock (sdpa)": ("sdpa", None),
        f"prism P={P} CR={cr:g}": ("eager", "prism"),
        f"exact P={P} CR={cr:g}": ("eager", "exact"),
    }


@torch.no_grad()
def one_run(model, tok, ids, attn, decode, P, cr):
    if getattr(model, "_prism_state", None) is not None:
        phf.disable_prism(model)
    model.set_attn_implementation(attn)
    if decode is not None:
        phf.enable_prism(model, P, compression_rate=cr, decode=decode)
    st = Stamp()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         logits_processor=LogitsProcessorList([st]), pad_token_id=tok.eos_token_id or 0,
                         return_dict_in_generate=True)
    t1 = time.perf_counter()
    # st.t[0]: after the prefill; st.t[k]: after the k-th one-token forward
    decode_s = st.t[-1] - st.t[0]
    cpu_s = st.c[-1] - st.c[0]
    return {"prefill_s": st.t[0] - t0, "decode_s": decode_s, "tokens_per_s": (len(st.t) - 1) / decode_s,
            "decode_cpu_s": cpu_s, "tokens_per_cpu_s": (len(st.c) - 1) / cpu_s,
            "total_s": t1 - t0, "tokens": out.sequences[0, ids.shape[1]:].tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--cr", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = Mo.load_smollm2()
    slot, book, offset = prompts(tok, a.prompt + 1)[a.prompt]
    ids, _ = split(slot, a.tokens)
    V = variants(a.partitions, a.cr)
    load0 = open("/proc/loadavg").read().split()[:3]
    runs = {k: [] for k in V}
    one_run(model, tok, ids, "eager", None, a.partitions, a.cr)        # warm-up
    one_run(model, tok, ids, "eager", "prism", a.partitions, a.cr)
    for r in range(a.repeats):
        for k, (attn, decode) in V.items():
            res = one_run(model, tok, ids, attn, decode, a.partitions, a.cr)
            runs[k].append(res)
            print(f"round {r} {k}: {res['tokens_per_s']:.1f} tok/s, {res['tokens_per_cpu_s']:.1f} tok/CPU-s (decode {res['decode_s']:.2f} s, "
                  f"prefill {res['prefill_s']:.2f} s)", flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]
    summary = {}
    for k, rs in runs.items():
        tps = [x["tokens_per_s"] for x in rs]
        summary[k] = {"median_tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps),
                      "runs_tokens_per_s": [round(x, 2) for x in tps],
                      "median_tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in rs),
                      "runs_tokens_per_cpu_s": [round(x["tokens_per_cpu_s"], 2) for x in rs],
                      "median_prefill_s": statistics.median(x["prefill_s"] for x in rs),
                      "same_tokens_every_run": all(x["tokens"] == rs[0]["tokens"] for x in rs)}
    ref = runs["stock (eager)"][0]["tokens"]
    for k in runs:
        summary[k]["tokens_equal_stock_eager"] = runs[k][0]["tokens"] == ref
    res = {"prompt": {"index": a.prompt, "book": book, "offset": offset, "tokens": a.tokens},
           "new_tokens": NEW, "partitions": a.partitions, "cr": a.cr, "threads": a.threads,
           "repeats": a.repeats, "load_before": load0, "load_after": load1,
           "torch": torch.__version__, "python": platform.python_version(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "summary": summary}
    for k, s in summary.items():
        print(f"{k}: median {s['median_tokens_per_s']:.1f} tok/s [{s['min']:.1f}, {s['max']:.1f}], "
              f"median {s['median_tokens_per_cpu_s']:.1f} tok/CPU-s")
    if a.out:
        p = Path(a.out)
        old = json.loads(p.read_text()) if p.exists() else {"runs": []}
        old["runs"].append(res)
        p.write_text(json.dumps(old, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation quality and KV memory of SmolLM2-135M under Prism (prism_kernels.hf).

For each prompt (a passage of Jane Austen of N tokens, followed by its true
continuation of NEW = 64 tokens) and each setting (P, CR, decode mode) it runs, from
ONE Prism prefill of the prompt (the mode's PrismCache, model under enable_prism):

* teacher forcing: the prefill's last logits and one forward of the 64 true
  continuation tokens through the same cache (decode positions N..N+63, causal) give
  the NLL of every continuation token -> bits per character of the continuation
  (characters = len(tokenizer.decode(continuation)));
* greedy decoding: from a copy of the cache after the prefill, 64 steps of
  argmax -> feed one token (the loop `generate(do_sample=False)` runs, without stopping at
  EOS; `--check-generate` compares it with model.generate on the first prompt);
* the cache report (prism_kernels.hf.cache_rows) after the prefill.

"stock" is the same with prism disabled (a transformers DynamicCache, eager attention).
Agreement, bpc and their intervals are computed from the per-prompt records by
make_doc.py. Records are appended to a JSON file keyed by (N, P, CR, mode, prompt), so
runs over prompt ranges resume and add up:

    PYTHONPATH=. python benchmarks/generation/bench_generation.py --tokens 512 --partitions 2 --cr 10 \
        --modes stock prism exact voltage --prompts 0 10 --out benchmarks/results/generation_records.json

Prompts: SLOTS of (1024 + 64) tokens drawn with seed 0 (numpy default_rng) from the
six novels (austen_body: no title page nor chapter headings), one novel after the other
(prompt i from novel i mod 6), non-overlapping within a novel. The 1024-token prompt is
the whole slot head, the 512-token prompt its last 512 tokens: both are followed by the
same continuation, so the two lengths are paired. One torch thread by default.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import prism_kernels.hf as phf  # noqa: E402
from prism_kernels.eval import data as D  # noqa: E402
from prism_kernels.eval import models as Mo  # noqa: E402

NEW = 64
LONGEST = 1024
SEED = 0
MODES = ("stock", "prism", "exact", "voltage")


def prompts(tok, count: int, seed: int = SEED):
    """count (slot ids [LONGEST + NEW], novel, token offset), drawn as in the module docstring."""
    books = D.load_austen_books()
    rng = np.random.default_rng(seed)
    width = LONGEST + NEW
    ids, free = {}, {}
    for name in D.AUSTEN_BOOKS:
        ids[name] = tok(D.austen_body(books[name]), add_special_tokens=False)["input_ids"]
        free[name] = list(rng.permutation(len(ids[name]) // width))
    out = []
    for i in range(count):
        name = D.AUSTEN_BOOKS[i % len(D.AUSTEN_BOOKS)]
        slot = int(free[name].pop(0))
        out.append((ids[name][slot * width:(slot + 1) * width], name, slot * width))
    return out


def split(slot, n_tokens: int):
    prompt = slot[LONGEST - n_tokens:LONGEST]
    cont = slot[LONGEST:LONGEST + NEW]
    return torch.tensor([prompt]), torch.tensor([cont])


def nll_bits(logits: torch.Tensor, targets: torch.Tensor) -> list:
    """Per-token NLL in bits of targets [T] under logits [T, V]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (-lp.gather(-1, targets[:, None]).squeeze(-1) / math.log(2)).tolist()


@torch.no_grad()
def run_one(model, ids, cont, mode: str) -> dict:
    """Prefill, teacher-forced continuation and greedy decoding for one prompt."""
    cache = None if mode == "stock" else phf.PrismCache(mode)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, cache=cache) if cache is not None else \
        model(input_ids=ids, use_cache=True)
    prefill_s = time.perf_counter() - t0
    cache = out.past_key_values
    first = out.logits[0, -1]
    rec = {"prefill_s": round(prefill_s, 3)}
    if mode != "stock":
        rep = phf.cache_rows(cache)
        rec.update(cache_rows=rep.rows[0][0], stock_rows=rep.stock_rows[0], cache_bytes=rep.bytes,
                   stock_bytes=rep.stock_bytes, gathered_bytes=rep.gathered_bytes)
    else:
        rec.update(cache_rows=ids.shape[1], stock_rows=ids.shape[1])
    greedy_cache = copy.deepcopy(cache)
    # teacher forcing: continuation tokens 0..62 fed, predicting 1..63; token 0 from the prefill
    tf = model(input_ids=cont[:, :-1], use_cache=True, cache=cache).logits[0]
    logits = torch.cat([first[None], tf], 0)
    rec["bits"] = [round(b, 5) for b in nll_bits(logits, cont[0])]
    rec["tf_argmax"] = logits.argmax(-1).tolist()
    # greedy
    cache = greedy_cache
    nxt = int(first.argmax())
    toks = [nxt]
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        o = model(input_ids=torch.tensor([[nxt]]), use_cache=True, cache=cache)
        cache = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
        toks.append(nxt)
    rec["decode_s"] = round(time.perf_counter() - t0, 3)
    rec["greedy"] = toks
    return rec


def setting_key(n, P, cr, mode):
    return "stock" if mode == "stock" else f"N{n}_P{P}_CR{cr:g}_{mode}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--partitions", type=int, nargs="+", default=[2])
    ap.add_argument("--cr", type=float, nargs="+", default=[10.0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--prompts", type=int, nargs=2, default=[0, 4], metavar=("FIRST", "END"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop starting new prompts after this long")
    ap.add_argument("--check-generate", action="store_true",
                    help="also compare the greedy loop with model.generate on the first prompt")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_records.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)
    model, tok = Mo.load_smollm2()
    slots = prompts(tok, a.prompts[1])
    path = Path(a.out)
    db = json.loads(path.read_text()) if path.exists() else {"records": {}}
    recs = db["records"]
    t_start = time.time()
    chunk = {"argv": sys.argv[1:], "start_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
             "load_before": open("/proc/loadavg").read().split()[:3], "threads": a.threads,
             "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    db.setdefault("chunks", []).append(chunk)

    def save():
        chunk["end_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        chunk["load_after"] = open("/proc/loadavg").read().split()[:3]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(db))
        os.replace(tmp, path)

    for n in a.tokens:
        for i in range(*a.prompts):
            if time.time() - t_start > a.budget_s:
                print(f"budget of {a.budget_s:.0f} s spent; stopped before N={n} prompt {i}", flush=True)
                save()
                return 3
            slot, book, offset = slots[i]
            ids, cont = split(slot, n)
            todo = [(None, None, "stock")] if "stock" in a.modes else []
            todo += [(P, cr, m) for P in a.partitions for cr in a.cr for m in a.modes if m != "stock"]
            for P, cr, mode in todo:
                key = f"{setting_key(n, P, cr, mode) if mode != 'stock' else f'N{n}_stock'}|{i}"
                if key in recs:
                    continue
                if mode == "stock":
                    if getattr(model, "_prism_state", None) is not None:
                        phf.disable_prism(model)
                else:
                    phf.enable_prism(model, P, compression_rate=cr, decode=mode)
                rec = run_one(model, ids, cont, mode)
                rec.update(prompt=i, book=book, offset=offset, n_tokens=n, P=P, cr=cr, mode=mode,
                           cont=cont[0].tolist(), cont_chars=len(tok.decode(cont[0])), threads=a.threads)
                if a.check_generate and i == a.prompts[0]:
                    g = model.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                                       pad_token_id=tok.eos_token_id or 0)
                    rec["generate_tokens"] = g[0, n:].tolist()
                    rec["generate_equal"] = rec["generate_tokens"] == rec["greedy"]
                recs[key] = rec
                print(f"{key}: prefill {rec['prefill_s']:.1f}s decode {rec['decode_s']:.1f}s "
                      f"bits/char {sum(rec['bits']) / rec['cont_chars']:.3f}"
                      + (f" generate_equal {rec['generate_equal']}" if "generate_equal" in rec else ""), flush=True)
                save()
    if getattr(model, "_prism_state", None):
        phf.disable_prism(model)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

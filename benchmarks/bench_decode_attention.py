"""CPU benchmark of prism::attention in the decode shape: one new query (B = 1,
Nq = 1) against a long key cache, fp32 (or --dtype bfloat16), d = 64.

Models: SmolLM2-135M-like (H = 9 query heads, Hkv = 3 kv heads, GQA) and
GPT-2-like (H = Hkv = 12). Nk = 1024, 2048, 4096, 8192 cached keys.

Methods (all timed interleaved in one process, per thread count):
  prism         torch.ops.prism.attention, cpp backend, as generation calls it
                (causal, positions, counts): the split-K decode path
                (csrc/attention_decode.cpp), chosen automatically
  prism_old     the same op with the decode path switched off
                (set_decode_enabled(False) around the call): the general
                kernels as they were before it
  sdpa          F.scaled_dot_product_attention(q, k, v, enable_gqa=True) on the
                same full key list (no mask: the new token sees every key),
                K/V not repeated
(a) full key list, counts of 1: prism vs prism_old vs sdpa = kernel efficiency.
(b) the cache a Prism prefill leaves on the last of P = 2 devices at CR 10:
    its own Nk/2 keys exact plus the (P-1) * m means of the other partition
    (m = Nk/2/10), with their counts; prism / prism_old on that vs sdpa on the
    full Nk keys = what a user gets per decode step.

Medians over single calls, the methods in a new random order every round; each
timed call follows an untimed call of the same method (warm cache) or, with
--cold, a 64 MiB write that evicts K/V from the caches (what a decode step sees
in a real model, where the other layers run in between). Writes
benchmarks/results/decode_attention.md (overwrites; --append to add a section).
Usage: python benchmarks/bench_decode_attention.py [--quick] [--reps N] [--threads 1 2]
                                                 [--dtype float32|bfloat16] [--append]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prism_kernels as pk  # noqa: E402
from common import fmt_time, format_table, machine_info, write_result  # noqa: E402
from python_ref.layout import device_tensors, plan_layout  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_attention.md")
MODELS = [("SmolLM2-135M-like", 9, 3), ("GPT-2-like", 12, 12)]
D = 64
P, CR = 2, 10


def _ext():
    from prism_kernels import ops
    return ops._ext()


def decode_inputs(H, Hkv, Nk, seed=0, dtype=torch.float32):
    """q [1, H, 1, d] and the full and compressed caches, in the layout HF uses
    ([B, N, H, d] storage viewed as [B, H, N, d])."""
    g = torch.Generator().manual_seed(seed)

    def hf(h, n):
        return torch.randn(1, n, h, D, generator=g).to(dtype).transpose(1, 2)

    q = hf(H, 1)
    k, v = hf(Hkv, Nk), hf(Hkv, Nk)
    full = dict(k=k, v=v, lc=torch.zeros(1, Nk), kp=torch.arange(Nk).view(1, Nk),
                qp=torch.tensor([[Nk]]))
    m = Nk // P // CR
    counts, _, kpos = device_tensors(plan_layout(Nk, P, m, causal=True), P - 1)
    n = counts.numel()
    comp = dict(k=hf(Hkv, n), v=hf(Hkv, n), lc=counts.float().log().view(1, n),
                kp=kpos.view(1, n), qp=torch.tensor([[Nk]]))
    return q, full, comp


def methods(q, full, comp):
    m = _ext()
    op = torch.ops.prism.attention
    scale = D ** -0.5

    def prism(c):
        return lambda: op(q, c["k"], c["v"], c["lc"], c["qp"], c["kp"], scale, "cpp")

    def prism_old(c):
        def f():
            m.set_decode_enabled(False)
            try:
                return op(q, c["k"], c["v"], c["lc"], c["qp"], c["kp"], scale, "cpp")
            finally:
                m.set_decode_enabled(True)
        return f

    return {
        "prism": prism(full), "prism_old": prism_old(full),
        "sdpa": lambda: F.scaled_dot_product_attention(q, full["k"], full["v"], enable_gqa=True),
        "prism_cmp": prism(comp), "prism_old_cmp": prism_old(comp),
    }


def timed_medians(fns, reps, cold=False, seed=0):
    """Median (and first quartile) seconds per call of each fn. Each sample is
    one call, preceded by an untimed call of the same fn (warm: its own K/V are
    in cache, whatever ran before) or by a write over a 64 MiB buffer (cold: K/V
    come from DRAM, as in generation, where the other layers run in between).
    The order of the methods is shuffled every round, so no method always
    follows the same other one."""
    import random
    import statistics
    import time
    rng = random.Random(seed)
    flush = torch.empty(16 * 2 ** 20) if cold else None
    names = list(fns)
    samples = {n: [] for n in names}
    for name in names:  # warm-up
        fns[name]()
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            if cold:
                flush.fill_(1.0)
            else:
                fns[name]()
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, xs in samples.items():
        qs = statistics.quantiles(xs, n=4)
        out[name] = {"median": statistics.median(xs), "q1": qs[0]}
    return out


def check_outputs(q, full, comp):
    """The timed calls compute the same thing (sanity, not the test suite)."""
    fns = methods(q, full, comp)
    ref = fns["sdpa"]()
    for name in ("prism", "prism_old"):
        out, _ = fns[name]()
        err = (out - ref).abs().max().item()
        assert err < (1e-4 if q.dtype == torch.float32 else 2e-2), (name, err)
    a, _ = fns["prism_cmp"]()
    b, _ = fns["prism_old_cmp"]()
    assert (a.float() - b.float()).abs().max().item() < (1e-4 if q.dtype == torch.float32 else 2e-2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Nk = 1024, 8192 only, fewer repeats")
    ap.add_argument("--reps", type=int, default=201)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cold", action="store_true",
                    help="flush the caches (write 64 MiB) before every timed call")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if not pk.cpp_variant():
        print("the C++ extension is not built; nothing to benchmark", file=sys.stderr)
        return 1
    nks = [1024, 8192] if args.quick else [1024, 2048, 4096, 8192]
    reps = 31 if args.quick else args.reps
    m = _ext()
    info = machine_info()
    info["loadavg_before"] = info.pop("loadavg")
    info["threads"] = " and ".join(map(str, args.threads)) + " (torch.set_num_threads)"
    info["dtype"] = f"{args.dtype}, d = 64, B = 1, Nq = 1"
    dtype = getattr(torch, args.dtype)
    info["repeats"] = (f"{reps} single calls per method, order shuffled every round, each after "
                       + ("a 64 MiB cache flush (cold)" if args.cold else
                          "an untimed call of the same method (warm cache)"))
    rows_a, rows_b = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model, H, Hkv in MODELS:
            for Nk in nks:
                q, full, comp = decode_inputs(H, Hkv, Nk, dtype=dtype)
                check_outputs(q, full, comp)
                n0 = m.decode_calls()
                # one call per sample: on a shared machine a preempted call is an
                # outlier the median drops, whereas a 2 ms batch of calls is
                # preempted about as often as not
                r = timed_medians(methods(q, full, comp), reps=reps, cold=args.cold)
                assert m.decode_calls() > n0, "the decode path never ran"
                t = {k: v["median"] for k, v in r.items()}
                q1 = {k: v["q1"] for k, v in r.items()}

                def cell(name):
                    return f"{fmt_time(t[name])} ({fmt_time(q1[name])})"
                chunk = m.decode_chunk(1, H, Hkv, 1, Nk, threads)
                chunks = -(-Nk // chunk) if chunk else 0
                rows_a.append([threads, model, Nk, f"{chunks} x {chunk}", cell("prism"),
                               cell("prism_old"), cell("sdpa"),
                               f"{t['prism_old'] / t['prism']:.2f}x", f"{t['sdpa'] / t['prism']:.2f}x"])
                nc = comp["k"].shape[2]
                rows_b.append([threads, model, Nk, nc, cell("prism_cmp"),
                               cell("prism_old_cmp"), cell("sdpa"),
                               f"{t['sdpa'] / t['prism_cmp']:.2f}x"])
                print(threads, model, Nk, {k: fmt_time(v) for k, v in t.items()}, flush=True)
    try:
        info["loadavg_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        pass
    body = [
        "The machine is shared with other jobs (the load average above is the "
        "whole machine's, before and after): treat small differences as noise. "
        "With 2 threads on 2 cores, any other running job takes a core from us, "
        "so those rows are the noisiest. Cells: median per call (first quartile in "
        "brackets, closer to the unloaded speed); ratios are of the medians.",
        "",
        "### (a) full key list, counts of 1: kernel efficiency",
        "",
        "prism = split-K decode path (chunks x keys per chunk), prism_old = the "
        "general kernel (decode path off), sdpa = F.scaled_dot_product_attention "
        "with enable_gqa=True (K/V not repeated). Ratios > 1: prism faster.",
        "",
        format_table(["threads", "model", "Nk", "chunks", "prism", "prism_old", "sdpa",
                      "old / prism", "sdpa / prism"], rows_a),
        "",
        f"### (b) Prism cache (P = {P}, CR {CR}: own Nk/2 keys + means) vs SDPA on the full cache",
        "",
        format_table(["threads", "model", "Nk", "prism keys", "prism", "prism_old", "sdpa (full)",
                      "sdpa / prism"], rows_b),
    ]
    title = f"Decode-step attention (CPU, {args.dtype}, {'cold' if args.cold else 'warm'} cache)"
    write_result(args.out, title, info, "\n".join(body), append=args.append)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

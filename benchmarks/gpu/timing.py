"""Timing part of the GPU check (GPU only): triton.testing.do_bench medians of

  * prism Triton kernel (this package),
  * FlexAttention, torch.compile'd, score_mod = + log count, block mask from positions,
  * SDPA with the equivalent float mask (log counts, -inf where masked),
  * SDPA over the full uncompressed sequence (what Voltage / a single device runs),

in bf16, TFLOP/s (useful FLOPs: 4 d per visible query-key pair) next to the
bf16 matmul rate measured in the same run; plus segment means against the
copy bandwidth and the plain-PyTorch backend. Every benchmark shape is also
spot-checked (gpu.check) on a sample of query rows, since the reference
cannot hold a 32k x 40k score matrix. Results: markdown and csv tables.
"""
from __future__ import annotations

import csv
import math
import os
import re
import time

import torch

import prism_kernels as pk
from prism_kernels import torch_backend

from .check import _gen, check_attention_case


# (label, B, H, Hkv, d, N_total, P, means per partition, device index, causal)
PAPER_SHAPES = [
    ("ViT-B/16 N=197 P=2 m=10", 512, 12, 12, 64, 197, 2, 10, 0, False),
    ("BERT-base N=256 P=2 m=1", 512, 12, 12, 64, 256, 2, 1, 0, False),
    ("GPT-2 N=256 P=2 CR=10", 512, 12, 12, 64, 256, 2, 13, 1, True),
]


def long_shapes():
    """P = 4 partitions, CR = 16 (n/16 means per partition); batch x heads fill the chip.
    Most informative first: the time budget cuts from the end."""
    def shape(n, d, causal):
        H, Hkv = (32, 8) if d == 128 else (16, 16)
        B = max(1, (32768 if d == 128 else 65536) // n)
        if causal:  # decoder: the last device sees its rows + means of all earlier ones
            return (f"n={n // 1024}k d={d} P=4 CR=16 causal", B, H, Hkv, d, 4 * n, 4, n // 16, 3, True)
        return (f"n={n // 1024}k d={d} P=4 CR=16", B, H, Hkv, d, 4 * n, 4, n // 16, 1, False)
    return [shape(8192, 128, False), shape(32768, 128, True), shape(8192, 64, False),
            shape(32768, 128, False), shape(4096, 128, False), shape(8192, 128, True),
            shape(16384, 128, False), shape(4096, 64, False), shape(32768, 64, False)]


def _bench(fn, rep=60):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _matmul_tflops(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b, rep=200)
    return 2 * 8192 ** 3 / ms / 1e9


def _flex_fns():
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention), create_block_mask


def bench_attention_shape(shape, device, deadline, flex):
    from prism_kernels.triton_kernels import attention_triton
    import torch.nn.functional as F
    label, B, H, Hkv, d, N, P, m, i, causal = shape
    dtype = torch.bfloat16
    plan = pk.plan_layout(N, P, m, causal=causal)
    counts, qp1, kp1 = pk.device_tensors(plan, i, device=device)
    Nq, Nk = qp1.numel(), kp1.numel()
    g = _gen(1234, device)
    q = torch.randn(B, H, Nq, d, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g, device=device, dtype=dtype)
    lc1 = counts.float().log()
    lc = lc1[None].expand(B, Nk)
    qp = qp1[None].expand(B, Nq) if causal else None
    kp = kp1[None].expand(B, Nk) if causal else None
    scale = 1.0 / math.sqrt(d)
    if causal:
        visible = torch.searchsorted(kp1.sort().values, qp1, right=True).sum().item()
    else:
        visible = Nq * Nk
    flops = 4.0 * B * H * d * visible
    row = dict(shape=label, B=B, H=H, Hkv=Hkv, d=d, Nq=Nq, Nk=Nk, causal=causal)

    # spot check on this shape (sampled query rows)
    rows = torch.randperm(Nq, device=device)[:128].sort().values
    case = (label, B, H, Hkv, d, ("dev", N, P, m, i, causal), ())
    chk = check_attention_case(attention_triton, case, dtype, device, 99, rows=rows)
    row["check"] = "PASS" if chk["ok"] else f"FAIL {chk['reason']}"

    ref_out = {}

    def record(key, fn, fl=flops):
        if time.time() > deadline:
            row[key + "_ms"] = None
            row[key + "_note"] = "skipped (time budget)"
            return
        try:
            res = fn()  # compile / autotune outside the timing
            res = res[0] if isinstance(res, tuple) else res
            torch.cuda.synchronize()
            # the baselines must compute the same thing: max |difference| to the prism kernel
            if key == "prism":
                ref_out["prism"] = res
            elif "prism" in ref_out and res.shape == ref_out["prism"].shape:
                row[key + "_maxdiff"] = (res.float() - ref_out["prism"].float()).abs().max().item()
            del res
            ms = _bench(fn)
            row[key + "_ms"] = ms
            row[key + "_tflops"] = fl / ms / 1e9
        except Exception as e:  # report, never hide: the note goes into the table
            row[key + "_ms"] = None
            row[key + "_note"] = f"error: {type(e).__name__}: {str(e)[:80]}"
        torch.cuda.empty_cache()

    record("prism", lambda: attention_triton(q, k, v, lc, qp, kp, scale))

    flex_attention, create_block_mask = flex
    lcd = lc1.to(torch.float32)

    def score_mod(score, b, h, qi, ki):
        return score + lcd[ki]

    block_mask = None
    if causal:
        def mask_mod(b, h, qi, ki):
            return kp1[ki] <= qp1[qi]
        try:
            block_mask = create_block_mask(mask_mod, None, None, Nq, Nk, device=device)
        except Exception as e:
            row["flex_note"] = f"block mask error: {e}"[:80]
    record("flex", lambda: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                          scale=scale, enable_gqa=(H != Hkv)))

    # SDPA baselines need K/V expanded to H heads (done outside the timing)
    ke = k.repeat_interleave(H // Hkv, dim=1) if H != Hkv else k
    ve = v.repeat_interleave(H // Hkv, dim=1) if H != Hkv else v
    mask = lc1.to(dtype)[None, None, None, :].expand(1, 1, Nq, Nk).contiguous()
    if causal:
        mask = mask.masked_fill(~(kp1[None, :] <= qp1[:, None])[None, None], float("-inf"))
    record("sdpa_mask", lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask, scale=scale))
    del mask, ke, ve
    torch.cuda.empty_cache()

    # the uncompressed problem: local queries against all N keys
    kf = torch.randn(B, H, N, d, generator=g, device=device, dtype=dtype)
    vf = torch.randn(B, H, N, d, generator=g, device=device, dtype=dtype)
    if causal:
        q_off = plan.offsets[i]
        full_visible = sum(q_off + a + 1 for a in range(Nq))
        try:
            from torch.nn.attention.bias import causal_lower_right
            qf = q
            kf2, vf2 = kf[:, :, : q_off + Nq], vf[:, :, : q_off + Nq]
            cm = causal_lower_right(Nq, q_off + Nq)
            record("sdpa_full", lambda: F.scaled_dot_product_attention(qf, kf2, vf2, attn_mask=cm, scale=scale),
                   fl=4.0 * B * H * d * full_visible)
        except ImportError:
            row["sdpa_full_note"] = "no causal_lower_right in this torch"
    else:
        record("sdpa_full", lambda: F.scaled_dot_product_attention(q, kf, vf, scale=scale),
               fl=4.0 * B * H * d * Nq * N)
    del kf, vf, q, k, v
    ref_out.clear()
    torch.cuda.empty_cache()
    return row


# decode step: (label, B, H, Hkv, d, Nq); Nk below. bf16, HF layout, causal with
# positions and counts (what generation passes).
DECODE_MODELS = [("SmolLM2-135M", 1, 9, 3, 64, 1), ("Llama-3-8B", 1, 32, 8, 128, 1),
                 ("Llama-3-8B B=8", 8, 32, 8, 128, 1)]
DECODE_NKS = (1024, 4096, 16384, 65536)


def bench_decode(device, deadline, models=DECODE_MODELS, nks=DECODE_NKS, P=2, cr=10):
    """One decode step (Nq new queries against the key cache), bf16, median ms of
      prism        attention_triton: split-K decode path (attention_decode.py), chosen automatically
      prism_gen    attention_triton with the decode path off (the general kernel)
      sdpa         F.scaled_dot_product_attention(enable_gqa=True) on the same full cache
      prism_cmp    prism on the cache a Prism prefill leaves on device P-1 (own Nk/P
                   rows + (P-1) * Nk/P/cr means, with counts): what a user gets
    plus GB/s of K/V read by prism on the full cache, and a check of prism's output
    against the fp32 reference (all heads, all queries: the reference is small here)."""
    from prism_kernels.triton_kernels import attention_triton, decode_split
    from prism_kernels.triton_kernels import attention_decode as ad
    import torch.nn.functional as F
    from python_ref.attention import _masked_softmax_attention
    dtype = torch.bfloat16
    rows = []
    for label, B, H, Hkv, d, Nq in models:
        for Nk in nks:
            row = dict(model=label, B=B, H=H, Hkv=Hkv, d=d, Nq=Nq, Nk=Nk)
            rows.append(row)
            if time.time() > deadline:
                row["note"] = "skipped (time budget)"
                continue
            try:
                g = _gen(4321, device)

                def hf(h, n):
                    return torch.randn(B, n, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2)

                q, k, v = hf(H, Nq), hf(Hkv, Nk), hf(Hkv, Nk)
                lc = torch.zeros(B, Nk, device=device)
                kp = torch.arange(Nk, device=device).expand(B, Nk)
                qp = torch.arange(Nk - Nq, Nk, device=device).expand(B, Nq)
                scale = 1.0 / math.sqrt(d)
                m = Nk // P // cr
                counts, _, kpc = pk.device_tensors(pk.plan_layout(Nk, P, m, causal=True), P - 1,
                                                   device=device)
                nc = counts.numel()
                kc, vc = hf(Hkv, nc), hf(Hkv, nc)
                lcc = counts.float().log()[None].expand(B, nc)
                kpc = kpc[None].expand(B, nc)
                row["Nk_prism"] = nc
                calls = ad.CALLS["split"]
                out, _ = attention_triton(q, k, v, lc, qp, kp, scale)
                row["split_ran"] = ad.CALLS["split"] > calls
                ref, _ = _masked_softmax_attention(q.float(), k.float(), v.float(), lc, qp, kp, scale, True)
                rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                row["rel_err"] = rel
                fns = {
                    "prism": lambda: attention_triton(q, k, v, lc, qp, kp, scale),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                   enable_gqa=(H != Hkv)),
                    "prism_cmp": lambda: attention_triton(q, kc, vc, lcc, qp, kpc, scale),
                }
                for key, fn in fns.items():
                    fn()
                    row[key + "_ms"] = _bench(fn)
                with decode_split(enabled=False):
                    fn = fns["prism"]
                    fn()
                    row["prism_gen_ms"] = _bench(fn)
                kv_bytes = 2 * B * Hkv * Nk * d * 2
                row["prism_GBps"] = kv_bytes / row["prism_ms"] / 1e6
                del q, k, v, kc, vc, ref, out
            except Exception as e:  # noqa: BLE001 - reported in the table
                row["note"] = f"error: {type(e).__name__}: {str(e)[:100]}"
            torch.cuda.empty_cache()
    return rows


def bench_segment_means(device, deadline):
    from prism_kernels.triton_kernels import segment_means_triton
    out = []
    for shape, m in (((8, 8192, 2048), 512), ((1, 32768, 4096), 1), ((16, 197, 768), 10)):
        if time.time() > deadline:
            out.append(dict(shape=str(shape), m=m, note="skipped (time budget)"))
            continue
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        segment_means_triton(x, m)
        ms = _bench(lambda: segment_means_triton(x, m))
        ms_copy = _bench(lambda: x.clone())
        ms_ref = _bench(lambda: torch_backend.segment_means(x, m))
        out.append(dict(shape=str(shape), m=m, triton_ms=ms, triton_GBps=nbytes / ms / 1e6,
                        copy_GBps=2 * nbytes / ms_copy / 1e6, torch_backend_ms=ms_ref))
        del x
    return out


def _gpu_slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def write_results(out_dir, gpu, versions, checks, matmul, attn_rows, seg_rows, elapsed,
                  decode_rows=()):
    os.makedirs(out_dir, exist_ok=True)
    slug = _gpu_slug(gpu)
    md = [f"# prism-kernels GPU check: {gpu}", "",
          f"{versions}; bf16 matmul (8192^3) measured in this run: **{matmul:.0f} TFLOP/s**; "
          f"total time {elapsed:.0f} s.", "", "## Correctness (relative error vs python_ref)", "",
          "| kernel | case | dtype | rel err | lse err | result |", "|---|---|---|---|---|---|"]
    for r in checks:
        md.append(f"| {r['kind']} | {r['case']} | {r['dtype']} | {r['rel_err']:.2e} | "
                  f"{r['lse_err']:.2e} | {'PASS' if r['ok'] else 'FAIL: ' + r['reason']} |")
    md += ["", "## Attention, bf16 (median ms and TFLOP/s; useful FLOPs = 4 d per visible pair)", "",
           "| shape | B | H/Hkv | d | Nq | Nk | check | prism ms | prism TF/s | % matmul | flex ms | "
           "prism/flex speed-up | sdpa+mask ms | prism/sdpa+mask | sdpa full ms | max diff flex / sdpa+mask | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in attn_rows:
        p, fl, sm, sf = (r.get(k + "_ms") for k in ("prism", "flex", "sdpa_mask", "sdpa_full"))
        pt = r.get("prism_tflops")
        notes = "; ".join(f"{k[:-5]}: {v}" for k, v in r.items() if k.endswith("_note"))
        md.append(
            f"| {r['shape']} | {r['B']} | {r['H']}/{r['Hkv']} | {r['d']} | {r['Nq']} | {r['Nk']} | "
            f"{r['check']} | {_f(p)} | {_f(pt, '{:.0f}')} | "
            f"{_f(pt / matmul * 100 if pt else None, '{:.0f}%')} | {_f(fl)} | "
            f"{_f(fl / p if (p and fl) else None, '{:.2f}x')} | {_f(sm)} | "
            f"{_f(sm / p if (p and sm) else None, '{:.2f}x')} | {_f(sf)} | "
            f"{_f(r.get('flex_maxdiff'), '{:.1e}')} / {_f(r.get('sdpa_mask_maxdiff'), '{:.1e}')} | {notes} |")
    md += ["", "## Segment means, bf16", "",
           "| x shape | m | triton ms | triton GB/s (read) | copy GB/s (read+write) | torch backend ms |",
           "|---|---|---|---|---|---|"]
    for r in seg_rows:
        md.append(f"| {r['shape']} | {r['m']} | {_f(r.get('triton_ms'))} | {_f(r.get('triton_GBps'), '{:.0f}')} | "
                  f"{_f(r.get('copy_GBps'), '{:.0f}')} | {_f(r.get('torch_backend_ms'))} | ")
    if decode_rows:
        md += ["", "## Decode step, bf16 (one new query, split-K path; median ms)", "",
               "prism: split-K decode path (automatic); prism general: decode path off; sdpa: "
               "F.scaled_dot_product_attention(enable_gqa) on the same full cache; prism cache: "
               "prism on the cache a P = 2, CR 10 prefill leaves (own rows + means). GB/s: K/V "
               "bytes of the full cache / prism time.", "",
               "| model | B | H/Hkv | d | Nk | split ran | rel err | prism ms | GB/s | prism general ms | "
               "sdpa ms | sdpa/prism | prism cache keys | prism cache ms | sdpa/prism cache | notes |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in decode_rows:
            p, sd, pc = r.get("prism_ms"), r.get("sdpa_ms"), r.get("prism_cmp_ms")
            md.append(
                f"| {r['model']} | {r['B']} | {r['H']}/{r['Hkv']} | {r['d']} | {r['Nk']} | "
                f"{r.get('split_ran', '-')} | {_f(r.get('rel_err'), '{:.1e}')} | {_f(p)} | "
                f"{_f(r.get('prism_GBps'), '{:.0f}')} | {_f(r.get('prism_gen_ms'))} | {_f(sd)} | "
                f"{_f(sd / p if (p and sd) else None, '{:.2f}x')} | {r.get('Nk_prism', '-')} | {_f(pc)} | "
                f"{_f(sd / pc if (pc and sd) else None, '{:.2f}x')} | {r.get('note', '')} |")
    path_md = os.path.join(out_dir, f"{slug}.md")
    with open(path_md, "w") as fh:
        fh.write("\n".join(md) + "\n")
    path_csv = os.path.join(out_dir, f"{slug}.csv")
    keys = sorted({k for r in attn_rows for k in r})
    with open(path_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["gpu", "matmul_tflops"] + keys)
        w.writeheader()
        for r in attn_rows:
            w.writerow(dict(gpu=gpu, matmul_tflops=round(matmul, 1), **r))
    return path_md, path_csv

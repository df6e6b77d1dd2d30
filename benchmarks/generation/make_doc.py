"""Summarise benchmarks/results/generation_records.json (bench_generation.py) and
generation_speed.json (bench_decode_speed.py) into generation_smollm2.{json,md,png}.

    python benchmarks/generation/make_doc.py [--records FILE] [--speed FILE] [--out-dir DIR]

Per setting (prompt length N, P, CR, decode mode), over the prompts that have both the
setting's record and the stock record:
* greedy agreement with stock greedy decoding over the 64 new tokens: tokens before the
  first divergence, and the share of the 64 positions whose token equals stock's; mean
  with a 95 % percentile bootstrap interval over prompts (2000 resamples, seed 0);
* bits per character of the true continuation (teacher-forced from the setting's cache):
  sum of bits / sum of characters, with the 95 % bootstrap interval over prompts and the
  paired difference to stock (prism_kernels.eval.metrics.ratio_bootstrap);
* the decoding device's KV cache after the prefill (prism_kernels.hf.cache_rows): rows
  per layer, bytes, and bytes as a share of a stock cache of the same prompt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prism_kernels.eval import metrics as Mx  # noqa: E402

NEW = 64


def mean_ci(x, seed=0):
    x = np.asarray(x, dtype=np.float64)
    idx = Mx._boot_indices(len(x), Mx.BOOTSTRAP_SAMPLES, seed)
    m = x[idx].mean(1)
    return float(x.mean()), [float(v) for v in np.percentile(m, [2.5, 97.5])]


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def summarise(records: dict) -> list:
    stock = {}
    groups = defaultdict(dict)
    for key, r in records.items():
        if r["mode"] == "stock":
            stock[(r["n_tokens"], r["prompt"])] = r
        else:
            groups[(r["n_tokens"], r["P"], r["cr"], r["mode"])][r["prompt"]] = r
    rows = []
    # stock itself
    for n in sorted({k[0] for k in stock}):
        rs = [stock[k] for k in sorted(stock) if k[0] == n]
        bits = np.array([sum(r["bits"]) for r in rs])
        chars = np.array([r["cont_chars"] for r in rs], dtype=np.float64)
        b = Mx.ratio_bootstrap(bits, chars)
        rows.append({"n_tokens": n, "P": 1, "cr": None, "mode": "stock", "n": len(rs), "bpc": b["value"],
                     "bpc_ci": b["ci"], "cache_rows": n, "cache_share": 1.0,
                     "generate_check": [r["generate_equal"] for r in rs if "generate_equal" in r]})
    for (n, P, cr, mode), by_prompt in sorted(groups.items()):
        prompts = sorted(p for p in by_prompt if (n, p) in stock)
        if not prompts:
            continue
        rs = [by_prompt[p] for p in prompts]
        ss = [stock[(n, p)] for p in prompts]
        prefix = [first_divergence(r["greedy"], s["greedy"]) for r, s in zip(rs, ss)]
        share = [float(np.mean([x == y for x, y in zip(r["greedy"], s["greedy"])])) for r, s in zip(rs, ss)]
        bits = np.array([sum(r["bits"]) for r in rs])
        sbits = np.array([sum(s["bits"]) for s in ss])
        chars = np.array([r["cont_chars"] for r in rs], dtype=np.float64)
        b = Mx.ratio_bootstrap(bits, chars, sbits)
        tf = [float(np.mean([x == y for x, y in zip(r["tf_argmax"], s["tf_argmax"])])) for r, s in zip(rs, ss)]
        tm, tci = mean_ci(tf)
        pm, pci = mean_ci(prefix)
        sm, sci = mean_ci(share)
        cb = {r["cache_bytes"] for r in rs}
        sb = {r["stock_bytes"] for r in rs}
        rows.append({
            "n_tokens": n, "P": P, "cr": cr, "mode": mode, "n": len(rs),
            "prefix": pm, "prefix_ci": pci, "share": sm, "share_ci": sci,
            "tf_top1": tm, "tf_top1_ci": tci,
            "identical": int(sum(p == NEW for p in prefix)),
            "bpc": b["value"], "bpc_ci": b["ci"], "bpc_diff": b["diff"], "bpc_diff_ci": b["diff_ci"],
            "cache_rows": rs[0]["cache_rows"], "stock_rows": rs[0]["stock_rows"],
            "cache_bytes": rs[0]["cache_bytes"], "stock_bytes": rs[0]["stock_bytes"],
            "cache_share": rs[0]["cache_bytes"] / rs[0]["stock_bytes"],
            "cache_bytes_constant": len(cb) == 1 and len(sb) == 1,
            "gathered_bytes": rs[0]["gathered_bytes"],
            "generate_check": [r["generate_equal"] for r in rs if "generate_equal" in r],
            "prompts": prompts,
        })
    return rows


def fmt_ci(v, ci, f="{:.3f}", sign=False):
    g = ("{:+" + f[2:]) if sign else f
    nz = lambda x: 0.0 if abs(x) < 5e-4 else x     # no "-0.000"
    v, ci = nz(v), [nz(x) for x in ci]
    return f"{g.format(v)} [{g.format(ci[0])}, {g.format(ci[1])}]"


def table(rows, n_tokens) -> str:
    out = ["| P | CR | decode | n | tokens before first divergence | share of 64 tokens = stock | identical 64 | "
           "teacher-forced top-1 = stock | "
           "bpc | Δ bpc vs stock | KV rows / layer | KV bytes (% of stock) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["n_tokens"] != n_tokens:
            continue
        if r["mode"] == "stock":
            out.append(f"| 1 | – | stock | {r['n']} | – | – | – | – | {fmt_ci(r['bpc'], r['bpc_ci'])} | – | "
                       f"{r['cache_rows']} | {2 * 30 * 3 * 64 * 4 * r['cache_rows'] / 2**20:.1f} MiB (100 %) |")
            continue
        mem = f"{r['cache_bytes'] / 2**20:.1f} MiB ({100 * r['cache_share']:.1f} %)"
        if r["gathered_bytes"]:
            mem += f", {r['gathered_bytes'] / 2**20:.1f} MiB gathered"
        out.append(f"| {r['P']} | {r['cr']:g} | {r['mode']} | {r['n']} | {fmt_ci(r['prefix'], r['prefix_ci'], '{:.1f}')} | "
                   f"{fmt_ci(100 * r['share'], [100 * x for x in r['share_ci']], '{:.1f}')} % | {r['identical']}/{r['n']} | "
                   f"{fmt_ci(100 * r['tf_top1'], [100 * x for x in r['tf_top1_ci']], '{:.1f}')} % | "
                   f"{fmt_ci(r['bpc'], r['bpc_ci'])} | {fmt_ci(r['bpc_diff'], r['bpc_diff_ci'], sign=True)} | "
                   f"{r['cache_rows']} | {mem} |")
    return "\n".join(out)


def speed_table(speed) -> str:
    if not speed:
        return "(not measured yet)"
    out = []
    for run in speed["runs"]:
        out.append(f"Prompt: {run['prompt']['tokens']} tokens ({run['prompt']['book']}), {run['new_tokens']} new "
                   f"tokens, greedy, batch 1, fp32, {run['threads']} thread(s), {run['repeats']} interleaved "
                   f"rounds, {run['date_utc']} UTC, load average before {' '.join(run['load_before'])}, after "
                   f"{' '.join(run['load_after'])}{', ' + run['label'] if run.get('label') else ''}.\n")
        out.append("| variant | decode tokens/s (wall), median [min, max] | runs (wall) | decode tokens per CPU-second, median | "
                   "runs (CPU) | same tokens as stock (eager) |")
        out.append("|---|---|---|---|---|---|")
        for k, s in run["summary"].items():
            out.append(f"| {k} | {s['median_tokens_per_s']:.1f} [{s['min']:.1f}, {s['max']:.1f}] | "
                       f"{', '.join(f'{x:.1f}' for x in s['runs_tokens_per_s'])} | "
                       f"{s['median_tokens_per_cpu_s']:.1f} | {', '.join(f'{x:.1f}' for x in s['runs_tokens_per_cpu_s'])} | "
                       f"{'yes' if s['tokens_equal_stock_eager'] else 'no'} |")
        out.append("")
        prism = next((k for k in run["summary"] if k.startswith("prism")), None)
        sdpa = run["summary"].get("stock (sdpa)")
        if prism and sdpa:
            # rounds are interleaved: round r of each variant ran back to back
            r = [a / b for a, b in zip(run["summary"][prism]["runs_tokens_per_s"], sdpa["runs_tokens_per_s"])]
            faster = sum(x > 1 for x in r)
            out.append(f"{prism} against stock (sdpa), round by round (wall): median ratio "
                       f"{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]; faster in {faster} of {len(r)} rounds.")
            out.append("")
    return "\n".join(out)


def plot(rows, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n, ls in ((512, "-"), (1024, "--")):
        for P, col in ((2, "C0"), (3, "C1")):
            for mode, mk in (("prism", "o"), ("exact", "s")):
                rs = sorted((r for r in rows if r["n_tokens"] == n and r["P"] == P and r["mode"] == mode),
                            key=lambda r: r["cr"])
                if not rs:
                    continue
                x = [r["cr"] for r in rs]
                lab = f"N={n} P={P} {mode}"
                ax[0].errorbar(x, [r["bpc_diff"] for r in rs],
                               yerr=np.array([[r["bpc_diff"] - r["bpc_diff_ci"][0], r["bpc_diff_ci"][1] - r["bpc_diff"]] for r in rs]).T,
                               ls=ls, marker=mk, color=col, label=lab, capsize=3)
                ax[1].errorbar(x, [100 * r["share"] for r in rs],
                               yerr=100 * np.array([[r["share"] - r["share_ci"][0], r["share_ci"][1] - r["share"]] for r in rs]).T,
                               ls=ls, marker=mk, color=col, label=lab, capsize=3)
    ax[0].axhline(0.05, color="r", ls=":", lw=0.8, label="target (+0.05)")
    ax[0].axhline(0.0, color="k", lw=0.6)
    ax[0].set(xscale="log", xlabel="CR", ylabel="Δ bits per character vs stock (paired)",
              title="Δ BPC of the true continuation (95 % CI)")
    ax[1].set(xscale="log", xlabel="CR", ylabel="% of the 64 greedy tokens = stock", title="Greedy agreement (95 % CI)")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", default=str(ROOT / "benchmarks/results/generation_records.json"))
    ap.add_argument("--speed", default=str(ROOT / "benchmarks/results/generation_speed.json"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--doc", default=str(ROOT / "docs/generation.md"),
                    help="a page whose tables section (between the markers) is replaced")
    a = ap.parse_args(argv)
    db = json.loads(Path(a.records).read_text())
    speed = json.loads(Path(a.speed).read_text()) if Path(a.speed).exists() else None
    rows = summarise(db["records"])
    out = Path(a.out_dir)
    chunks = db.get("chunks", [])
    (out / "generation_smollm2.json").write_text(json.dumps({"settings": rows, "chunks": chunks,
                                                             "speed": speed}, indent=1))
    has_plot = plot(rows, out / "generation_smollm2.png")
    md = ["# Generation on SmolLM2-135M under Prism: agreement, bits per character, KV memory, decode speed", "",
          "Made by `benchmarks/generation/make_doc.py` from `generation_records.json` "
          "(`benchmarks/generation/bench_generation.py`) and `generation_speed.json` "
          "(`benchmarks/generation/bench_decode_speed.py`); the method is in [docs/generation.md](../../docs/generation.md).", ""]
    note = db.get("note")
    md.append(MACHINE.format(**machine(chunks), note=" " + note if note else ""))
    for n in sorted({r["n_tokens"] for r in rows}):
        md += [f"## Prompts of {n} tokens", "", table(rows, n), ""]
    md += ["## Decode speed", "", speed_table(speed), ""]
    md += ["![bpc and agreement against CR](generation_smollm2.png)" if has_plot else "(matplotlib missing: no plot)", ""]
    (out / "generation_smollm2.md").write_text("\n".join(md))
    doc = Path(a.doc)
    if doc.exists():
        text = doc.read_text()
        a0, a1 = "<!-- tables: made by benchmarks/generation/make_doc.py -->", "<!-- /tables -->"
        if a0 in text and a1 in text:
            body = []
            for n in sorted({r["n_tokens"] for r in rows}):
                body += [f"### Prompts of {n} tokens", "", table(rows, n), ""]
            body += ["### Decode speed", "", speed_table(speed), ""]
            body = "\n".join(body).replace("](generation_smollm2.png)", "](../benchmarks/results/generation_smollm2.png)")
            text = text[:text.index(a0) + len(a0)] + "\n\n" + body + "\n" + text[text.index(a1):]
            doc.write_text(text)
    print("\n".join(md))


MACHINE = """Machine: {cpu}, {cores} cores, shared with other work (load averages below); torch {torch},
transformers {transformers}; quality runs with {threads} torch thread; {chunks} chunks of at most ~5 minutes
between {start} and {end} UTC; load average (1 min) at the start of the chunks {lb}, at their ends {la}.
Model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32, `prism_kernels.eval.models.load_smollm2`),
eager attention for stock. Prompts: seed 0, passages of the six Jane Austen novels (janeaustenr) drawn as
in `bench_generation.py`; every prompt is followed by its true 64-token continuation. Intervals are 95 %
(bootstrap over prompts, 2000 resamples); n = prompts.{note}
"""


def machine(chunks):
    cpu = "?"
    cores = "?"
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(l.split(":", 1)[1].strip() for l in info if l.startswith("model name"))
        cores = sum(1 for l in info if l.startswith("processor"))
    except Exception:
        pass
    lb = [float(c["load_before"][0]) for c in chunks if "load_before" in c]
    la = [float(c["load_after"][0]) for c in chunks if "load_after" in c]
    rng = lambda v: f"{min(v):.2f}-{max(v):.2f}" if v else "not recorded"
    return {"cpu": cpu, "cores": cores, "torch": chunks[0]["torch"] if chunks else "?",
            "transformers": chunks[0]["transformers"] if chunks else "?",
            "threads": chunks[0]["threads"] if chunks else 1, "chunks": len(chunks),
            "start": min((c["start_utc"] for c in chunks), default="?"),
            "end": max((c.get("end_utc", "") for c in chunks), default="?"), "lb": rng(lb), "la": rng(la)}


if __name__ == "__main__":
    main()

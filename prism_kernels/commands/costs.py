"""`prism costs`: FLOPs and communication of single device / Voltage / Prism.

    prism costs --model {vit-b16,bert-base,gpt2,roberta-base,qwen2-0.5b,TYPE,CONFIG.json} --seq-len N
                (--partitions P | --sizes 100,50 | --weights 2,1) (--means M | --cr CR)
                [--averaging attention_input|block_input] [--wire-dtype fp32]
                [--input-dtype int64|int32|fp32|uint8] [--json]
    prism costs --paper [--json]     (the paper's settings next to its figures)

P devices split N evenly; --sizes gives each partition's tokens (uneven allowed),
--weights sizes in proportion (device speeds). M is the number of segment means
per partition; CR gives m = ceil(n_i / CR) per partition (Eq. 16). FLOPs are
counted by running each device's share of the model (built from its config on
the meta device) under torch.utils.flop_counter. The start-up bytes (once per
inference) are given for both `prism run --input raw` (each device's slice of the
raw input, in --input-dtype) and `--input hidden` (fp32 hidden states). See docs/costs.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from prism_kernels.anchors import check_anchor_topk
from prism_kernels.policy_args import add_policy_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    from prism_kernels.costs.comm import DTYPE_BYTES
    from prism_kernels.costs.model_configs import PRESETS

    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}), a transformers model type "
                                   f"(e.g. llama) or a config.json file/directory")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length N (presets default to the paper's: vit-b16 197, bert-base 256, gpt2 256)")
    p.add_argument("--partitions", type=int, default=None, help="number of devices P (1 <= P <= N), equal split")
    p.add_argument("--sizes", default=None, help="comma-separated tokens per partition (sum N), instead of -P")
    p.add_argument("--weights", default=None, help="comma-separated relative device speeds: sizes in "
                                                   "proportion, instead of --partitions")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--means", type=int, default=None, help="segment means per partition M (1 <= M <= n_i)")
    g.add_argument("--cr", type=float, default=None, help="compression rate CR >= 1 (m_i = ceil(n_i / CR))")
    # --dtype: the older name, kept as an alias
    p.add_argument("--wire-dtype", "--dtype", dest="dtype", choices=list(DTYPE_BYTES), default="fp32",
                   help="element type of the rows sent (default fp32); `prism run --wire-dtype` "
                        "sends fp32, fp16 or bf16")
    from prism_kernels.costs.comm import INPUT_DTYPE_BYTES
    p.add_argument("--input-dtype", choices=list(INPUT_DTYPE_BYTES), default=None,
                   help="element type of the raw input in the start-up bytes (default: int64 token ids, "
                        "uint8 pixels for images, as `prism run` sends them; fp32 for normalised "
                        "pixel_values, `prism run --pixels float`)")
    p.add_argument("--averaging", choices=("attention_input", "block_input"), default="attention_input",
                   help="what the means are taken of; sets the wire format (rotary models send K/V means "
                        "under attention_input)")
    # the segment policy as `prism run` takes it; data-dependent choices send each row's count too (4 bytes)
    add_policy_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings next to the paper's figures (Tables IV-VI)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("costs", help="FLOPs and communication: single device vs Voltage vs Prism",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args, p))
    return p


def _validate(args, p: argparse.ArgumentParser):
    """Check the arguments; parser.error (exit 2) names the argument and the rule."""
    from prism_kernels.costs.model_configs import resolve_model
    from prism_kernels.plan import make_plan

    if args.model is None:
        p.error("the following argument is required: --model (or use --paper)")
    try:
        spec = resolve_model(args.model)
    except ValueError as e:
        p.error(f"argument --model: {e}")
    from prism_kernels.costs.report import resolve_seq_len
    try:
        n = resolve_seq_len(spec, args.seq_len)
    except ValueError as e:
        p.error(f"argument {'--seq-len' if str(e).startswith('seq_len') else '--model'}: {e}")
    given = [f for f in ("partitions", "sizes", "weights") if getattr(args, f) is not None]
    if not given:
        p.error("the following argument is required: --partitions (or --sizes / --weights)")
    if len(given) > 1:
        p.error(f"argument --{given[1]}: not allowed with argument --{given[0]}")
    if args.partitions is not None and args.partitions < 1:
        p.error(f"argument --partitions: must be >= 1, got {args.partitions}")
    if args.partitions is not None and args.partitions > n:
        p.error(f"argument --partitions: must be <= the sequence length N = {n} "
                f"(every device needs at least one token), got {args.partitions}")
    split = {}
    for f, kind in (("sizes", int), ("weights", float)):
        if getattr(args, f) is not None:
            try:
                split[f] = [kind(x) for x in getattr(args, f).split(",")]
                make_plan(n, **split, num_means=1)
            except ValueError as e:
                p.error(f"argument --{f}: {e}")
    sizes = list(make_plan(n, args.partitions, num_means=1, **split).sizes)
    if args.means is None and args.cr is None:
        p.error("one of the arguments --means --cr is required")
    if args.means is not None:
        smallest = min(sizes)
        if args.means < 1:
            p.error(f"argument --means: must be >= 1, got {args.means}")
        if args.means > smallest:
            p.error(f"argument --means: must be <= the smallest partition size ({smallest} tokens for "
                    f"N = {n}, P = {len(sizes)}), got {args.means}")
    if args.cr is not None and (not math.isfinite(args.cr) or args.cr < 1):
        p.error(f"argument --cr: must be a finite number >= 1, got {args.cr:g}")
    return spec, n, split


def _paper(args) -> int:
    from prism_kernels.costs.flops import COUNTED_TERMS
    from prism_kernels.costs.paper import format_comparison, headline_comparison

    rows = headline_comparison()
    if args.json:
        print(json.dumps([{"setting": r.setting, "figure": r.metric, "ours": r.ours, "paper": r.paper,
                           "diff_pct": r.diff_pct} for r in rows]))
        return 0
    print("Paper settings: ours vs the paper's Tables IV-VI")
    print(format_comparison(rows))
    print("GPT-2 CR: the paper lists the requested CR (10); ours is achieved, Voltage PDPLC / Prism PDPLC = "
          "128/13 with m = ceil(128/10) = 13 (Eq. 16). ViT CR: the paper rounds PDPLC 98.5 to 99.")
    print(f"FLOPs counted: {COUNTED_TERMS}.")
    return 0


def run(args, p: argparse.ArgumentParser) -> int:
    if args.paper:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "seq_len", "partitions", "sizes", "weights",
                                                       "means", "cr")
                 if getattr(args, k) is not None]
        if given:
            p.error(f"argument --paper: takes no setting arguments (got {' '.join(given)})")
        return _paper(args)
    from prism_kernels.costs.comm import DTYPE_BYTES
    from prism_kernels.costs.report import estimate, format_report

    spec, n, split = _validate(args, p)
    try:
        check_anchor_topk(args.anchor_topk, "--anchor-topk")
    except ValueError as e:
        p.error(str(e))
    try:
        report = estimate(spec, n, args.partitions, num_means=args.means, compression_rate=args.cr,
                          dtype_bytes=DTYPE_BYTES[args.dtype], averaging=args.averaging,
                          anchors=args.anchors, anchor_budget=args.anchor_budget, segments=args.segments,
                          anchor_topk=args.anchor_topk, anchor_score=args.anchor_score,
                          count_bias=args.count_bias, input_dtype=args.input_dtype, **split)
    except ValueError as e:           # rules checked in the library (none expected after _validate)
        p.error(str(e))
    if args.json:
        d = report.to_dict()
        d["dtype"] = d["wire_dtype"] = args.dtype
        json.dump(d, sys.stdout)
        print()
    else:
        print(format_report(report))
    return 0

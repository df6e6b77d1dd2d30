"""`prism run`: the torchrun-launched entry point.

    torchrun --standalone --nproc-per-node 2 -m prism_kernels.distributed --family vit --size tiny --mode prism --cr 10
    prism run --nproc 2 --family vit --size tiny --mode prism --cr 10      # spawns torchrun itself
    prism run --nproc 2 --model DIR --seq-len 64 --cr 4                    # a saved model; family from its config

Without torchrun, the usual variables work too (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), which is how the tests and the network-namespace benchmark start
one process per rank.

Exit status: 0 on success; 2 refused before compute (bad configuration, P > N,
ranks that disagree, wrong world size); 3 a peer died or stalled (the message
names it); 1 any other error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import timedelta

from ..anchors import check_anchor_topk
from ..policy_args import add_policy_arguments  # noqa: F401  (prism run's and prism generate's flags)


def add_arguments(p: argparse.ArgumentParser):
    from prism_kernels.models import MODEL_TYPES, SIZES
    p.add_argument("--family", default=None, choices=MODEL_TYPES,
                   help="model type, random weights from a config of --size (default bert; "
                        "with --model, the model's own config.model_type)")
    p.add_argument("--size", default="tiny", choices=tuple(SIZES),
                   help="random config: tiny (tests), small, base (ViT-B/16, BERT-base, GPT-2 small)")
    p.add_argument("--model", default=None, help="a local Hugging Face model directory (save_pretrained) "
                                                  "instead of random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=None, help="tokens of the random text input")
    p.add_argument("--text", default=None, help="text to tokenise (needs --model with a tokenizer)")
    p.add_argument("--mode", default="prism", choices=("prism", "voltage", "single"))
    p.add_argument("-m", "--num-means", type=int, default=None, help="segment means per partition")
    p.add_argument("--cr", type=float, default=None, help="compression rate (Eq. 16)")
    p.add_argument("--averaging", default="attention_input", choices=("attention_input", "block_input"),
                   help="what the means are taken of: the keys'/values' input (default) or the block "
                        "input (the paper's); docs/method.md, \"What is averaged\"")
    add_policy_arguments(p)
    p.add_argument("--speeds", default=None,
                   help="comma-separated relative speed of each rank (e.g. 1,0.5): partition sizes in "
                        "proportion (plan.proportional_sizes)")
    p.add_argument("--partition-weights", default=None, help="the older name of --speeds")
    p.add_argument("--calibrate", action="store_true",
                   help="measure each rank's speed at start-up (one block on a short input) and size "
                        "the partitions in proportion; not with --speeds")
    p.add_argument("--rebalance", action="store_true",
                   help="after each warm-up inference, size the partitions in proportion to each "
                        "rank's measured rows per second of compute (the sizes are fixed for the "
                        "timed runs); needs --warmup >= 1; starts from --speeds or --calibrate if given")
    p.add_argument("--input", default="raw", choices=("raw", "hidden", "local"),
                   help="what rank 0 sends each rank at start-up: its slice of the raw input, which it "
                        "embeds itself (token ids; an image's pixel rows; default), or its partition "
                        "of hidden states embedded by rank 0; local: nothing, every rank holds the "
                        "input (its own sensor or text shard) and embeds its slice")
    p.add_argument("--pixels", default="auto", choices=("auto", "uint8", "float"),
                   help="image models: the random image as 8-bit pixels (1 byte a value, as a camera "
                        "gives them; auto, the default), which every rank normalises itself as the "
                        "model's image processor does (models.ModelType.pixel_values), or as normalised "
                        "float pixel_values (4 bytes a value)")
    p.add_argument("--no-overlap", action="store_true", help="wait for the means before any attention")
    # no argparse choices: validate() refuses an unknown dtype, so a Namespace built in
    # Python is checked the same way as the command line
    p.add_argument("--wire-dtype", default="fp32", metavar="{fp32,fp16,bf16}",
                   help="element type of what is sent every layer (means, Voltage's rows); cast back "
                        "to the compute dtype on receipt (default fp32)")
    p.add_argument("--gather", default="head", choices=("head", "all"),
                   help="what the master collects: what the head needs, or every row")
    p.add_argument("--partitions", "-P", type=int, default=None,
                   help="expected number of partitions; must equal the world size")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is declared stalled")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeat", type=int, default=1, help="timed inferences (>= 1)")
    p.add_argument("--warmup", type=int, default=0, help="untimed inferences first")
    p.add_argument("--interleave-single", action="store_true",
                   help="also time the stock model on rank 0 alone before every run (same load conditions)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the final comparison with the stock model on rank 0 alone (output "
                        "difference and latency; costs --warmup + --repeat single-device inferences)")
    p.add_argument("--out", default=None, help="rank 0 writes outputs, bytes and timings here (torch.save)")
    p.add_argument("--json", action="store_true", help="rank 0 prints one JSON line of results")
    p.add_argument("--nproc", type=int, default=None,
                   help="spawn torchrun with this many processes on this machine (loopback)")


def load_model(args):
    """(table entry, model): a saved model (its family from config.model_type) or random weights."""
    from prism_kernels.models import lookup
    if args.model:
        import transformers as tf
        entry = lookup(tf.AutoConfig.from_pretrained(args.model))
        if args.family is not None and args.family != entry.model_type:
            raise ValueError(f"--family {args.family} but {args.model} holds a {entry.model_type} model")
        return entry, entry.load(args.model)
    entry = lookup(args.family or "bert")
    return entry, entry.build_model(args.size, seed=args.seed)


MAX_WORLD = 8       # ranks the runtime supports (partitions, processes)


class Refused(ValueError):
    """A command line refused before any process starts or any compute: one line naming
    the argument and the rule (`prism run` exits 2)."""


def _check_args(args):
    """The checks that need no model: kept for callers; validate() does them all."""
    validate(args, world=None, model=False)


def _positive_int(args, dest, flag, minimum=1):
    v = getattr(args, dest, None)
    if v is not None and v < minimum:
        raise Refused(f"{flag} must be >= {minimum}, got {v}")


def validate(args, world=None, model=True):
    """Check every argument of `prism run` before any process starts (and again in each
    rank, before the process group). Raises Refused, a ValueError whose message names the
    argument and the rule. `world`: the number of processes when known (--nproc, or
    WORLD_SIZE in a rank). `model`: also read the model's config (local only, never a hub)
    to check --seq-len against the model's positions."""
    import math
    from prism_kernels.costs.comm import check_wire_dtype
    from prism_kernels.plan import check_compression_rate
    # processes, partitions
    if args.nproc is not None and not 1 <= args.nproc <= MAX_WORLD:
        raise Refused(f"--nproc must be between 1 and {MAX_WORLD} (processes the runtime supports), "
                      f"got {args.nproc}")
    if world is None:
        world = args.nproc
    if world is not None and not 1 <= world <= MAX_WORLD:
        raise Refused(f"world size {world}; supported: 1 to {MAX_WORLD}")
    if args.partitions is not None:
        if args.partitions < 1:
            raise Refused(f"--partitions must be >= 1, got {args.partitions}")
        if world is not None and args.partitions != world:
            src = f" (--nproc {args.nproc})" if args.nproc is not None else ""
            raise Refused(f"--partitions {args.partitions} but the world size is {world}{src}: "
                          f"they must be equal")
    # means / compression rate
    if args.num_means is not None and args.cr is not None:
        raise Refused(f"-m/--num-means {args.num_means} and --cr {args.cr:g} given: "
                      f"give exactly one of num_means (means per partition) or compression_rate")
    if args.num_means is not None and args.num_means < 1:
        raise Refused(f"-m/--num-means must be >= 1, got {args.num_means}")
    if args.cr is not None:
        try:
            check_compression_rate(args.cr)
        except ValueError:
            raise Refused(f"--cr must be a finite number >= 1 (the compression rate, Eq. 16), "
                          f"got {args.cr:g}") from None
    if args.mode == "prism" and args.num_means is None and args.cr is None:
        raise Refused("prism mode needs -m/--num-means or --cr")
    if args.mode != "prism" and (args.num_means is not None or args.cr is not None):
        raise Refused(f"-m/--num-means and --cr apply to --mode prism only, not --mode {args.mode}")
    try:
        check_wire_dtype(getattr(args, "wire_dtype", "fp32"), "--wire-dtype")
        check_anchor_topk(getattr(args, "anchor_topk", "auto"), "--anchor-topk")
    except ValueError as e:
        raise Refused(str(e)) from None
    speeds_flag, _ = _speeds_arg(args)
    if getattr(args, "calibrate", False) and speeds_flag is not None:
        raise Refused(f"--calibrate and {speeds_flag} given: give one (measured or stated speeds)")
    if args.mode == "single" and (speeds_flag is not None or getattr(args, "calibrate", False)):
        raise Refused(f"{speeds_flag or '--calibrate'} applies to --mode prism or voltage (single "
                      f"mode has no partitions)")
    parse_speeds(args, world)
    # timing, threads
    if args.repeat < 1 or args.warmup < 0:
        raise Refused(f"--repeat must be >= 1 and --warmup >= 0, got --repeat {args.repeat} "
                      f"--warmup {args.warmup}")
    if getattr(args, "rebalance", False):
        if args.mode == "single":
            raise Refused("--rebalance applies to --mode prism or voltage (single mode has no partitions)")
        if args.warmup < 1:
            raise Refused(f"--rebalance measures the warm-up inferences: needs --warmup >= 1, got "
                          f"--warmup {args.warmup}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise Refused(f"--timeout must be a finite number of seconds > 0, got {args.timeout:g}")
    _positive_int(args, "threads", "--threads")
    # input
    if args.text is not None and not args.model:
        raise Refused("--text needs --model (a local model directory with a tokenizer)")
    if args.text is not None and args.seq_len is not None:
        raise Refused("give --text or --seq-len, not both (the text sets the length)")
    if args.text is not None and not args.text:
        raise Refused("--text must not be empty")
    if args.seq_len is not None and args.seq_len < 1:
        raise Refused(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.out is not None:
        d = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(d):
            raise Refused(f"--out {args.out}: directory {d} does not exist")
    # everything that needs the world size, in one place: the PrismConfig of this run
    if world is not None:
        try:
            run_config(args, world)
        except Refused:
            raise
        except ValueError as e:
            raise Refused(str(e)) from None
    if model:
        check_model_args(args, world)


def model_config(args):
    """(table entry, config) of the run, without weights and without any network:
    --model DIR must be a local directory with a config.json."""
    from prism_kernels.models import lookup
    if args.model:
        if not os.path.isdir(args.model):
            raise Refused(f"--model {args.model}: directory does not exist (a local model directory "
                          f"saved with save_pretrained is needed; no hub is contacted)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise Refused(f"--model {args.model}: the directory has no config.json")
        import transformers as tf
        try:
            cfg = tf.AutoConfig.from_pretrained(args.model, local_files_only=True)
            entry = lookup(cfg)
        except (ValueError, OSError) as e:
            raise Refused(f"--model {args.model}: {str(e).splitlines()[0]}") from None
        if args.family is not None and args.family != entry.model_type:
            raise Refused(f"--family {args.family} but {args.model} holds a {entry.model_type} model")
        return entry, cfg
    entry = lookup(args.family or "bert")
    return entry, entry.build_config(args.size)


def resolve_pixels(pixels: str, entry) -> str:
    """--pixels "auto": 8-bit pixels for image models (what a camera gives; a quarter of the
    start-up bytes of fp32 pixel_values); text models take no pixels ("float", unused)."""
    if pixels == "auto":
        return "uint8" if entry.input_kind == "image" else "float"
    return pixels


def check_model_args(args, world=None):
    """The checks that need the model's config: --seq-len given for a text family (unless
    --text), within the model's positions and at least the world size (P <= N)."""
    from prism_kernels.costs.comm import MATCHED_AT_FIRST_TOKEN
    from prism_kernels.costs.report import resolve_seq_len
    from .runtime import matched_cls_refusal
    entry, cfg = model_config(args)
    if entry.input_kind == "text":
        if args.text is None and args.seq_len is None:
            raise Refused(f"--seq-len is required for the {entry.model_type} family (text input; "
                          f"random token ids of that length)")
    elif args.text is not None:
        raise Refused(f"--text does not apply to the {entry.model_type} family (image input)")
    bias = getattr(args, "count_bias", "auto")
    if args.mode == "prism" and bias in MATCHED_AT_FIRST_TOKEN and not (
            entry.query_proj_path and entry.key_proj_path and entry.value_proj_path and not entry.rotary):
        raise Refused(matched_cls_refusal(bias, entry.model_type))   # (the runtime checks each layer too)
    if getattr(args, "pixels", "auto") != "auto" and entry.input_kind != "image":
        raise Refused(f"--pixels {args.pixels} applies to image models, not to the {entry.model_type} family")
    if args.seq_len is not None:
        try:
            resolve_seq_len(cfg, args.seq_len)
        except ValueError as e:
            msg = str(e)
            raise Refused("--seq-len" + msg[len("seq_len"):] if msg.startswith("seq_len") else
                          f"--seq-len: {msg}") from None
        if world is not None and world > args.seq_len:
            raise Refused(f"--seq-len {args.seq_len}: {world} partitions (world size) for {args.seq_len} "
                          f"tokens; P must be <= the number of tokens")
    return entry, cfg


def _speeds_arg(args):
    """(flag, value) of the stated speeds: --speeds or its older name --partition-weights."""
    speeds, old = getattr(args, "speeds", None), getattr(args, "partition_weights", None)
    if speeds is not None and old is not None:
        raise Refused("--speeds and --partition-weights given: --partition-weights is the older name "
                      "of --speeds, give one")
    if speeds is not None:
        return "--speeds", speeds
    if old is not None:
        return "--partition-weights", old
    return None, None


def parse_speeds(args, world=None):
    """The stated speeds as a tuple of floats (None when not given), checked: numbers,
    finite and > 0, one per rank when the world size is known."""
    import math
    flag, value = _speeds_arg(args)
    if value is None:
        return None
    try:
        speeds = tuple(float(w) for w in value.split(","))
    except ValueError:
        raise Refused(f"{flag} must be comma-separated numbers, got {value!r}") from None
    bad = [w for w in speeds if not (math.isfinite(w) and w > 0)]
    if bad:
        raise Refused(f"{flag} must be finite numbers > 0 (relative speeds), got {value!r}")
    if world is not None and len(speeds) != world:
        raise Refused(f"{flag} {value}: partition_weights must have one weight per partition ({world}), "
                      f"got {len(speeds)}")
    return speeds


def run_config(args, world: int, weights=None):
    """The RunConfig of the command line: a PrismConfig with P = the world size in prism mode.
    `weights`: measured speeds (--calibrate), instead of the stated ones."""
    from prism_kernels.config import PrismConfig
    from .runtime import RunConfig
    prism = None
    if weights is None:
        weights = parse_speeds(args, world)
    if args.mode == "prism":
        prism = PrismConfig(num_partitions=world, num_means=args.num_means, compression_rate=args.cr,
                            averaging=args.averaging, partition_weights=weights, anchors=args.anchors,
                            segments=args.segments, anchor_budget=args.anchor_budget,
                            anchor_topk=args.anchor_topk, anchor_score=args.anchor_score,
                            count_bias=getattr(args, "count_bias", "auto"))
    elif args.mode == "voltage" and weights is not None:     # Voltage: the same partitions, CR = 1
        prism = PrismConfig(num_partitions=world, compression_rate=1.0, partition_weights=weights)
    return RunConfig(mode=args.mode, prism=prism, overlap=not args.no_overlap, gather=args.gather,
                     wire_dtype=getattr(args, "wire_dtype", "fp32"), input=getattr(args, "input", "raw"))


def fail(rank, code, msg, command="prism run"):
    sys.stderr.write(f"{command}: rank {rank}: error: {msg}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)   # never wait on a broken process group


_fail = fail


def refuse_nproc_inside_rank(args, rank: int, world: int, command: str = "prism run") -> None:
    """--nproc given to a rank that torchrun (or RANK/WORLD_SIZE) already started."""
    if args.nproc is not None and args.nproc != world:
        fail(rank, 2, f"refused before any compute: --nproc {args.nproc} inside a launched rank "
                      f"(world size {world}); drop --nproc when torchrun or RANK/WORLD_SIZE start the ranks",
             command)


def build_runtime(model, cfg, n_tokens: int, meta: dict, timeout_s: float, comm=None):
    """(Comm, Runtime) for the input agreed in the handshake (a new Comm unless one is
    given); a setting the runtime refuses becomes a ConfigRefused (exit 2)."""
    import torch

    from .comm import Comm
    from .handshake import ConfigRefused
    from .runtime import Runtime
    comm = comm if comm is not None else Comm(timeout_s=timeout_s)
    try:
        rt = Runtime(model, comm, cfg, n_tokens, input_shape=meta["shape"],
                     input_dtype=getattr(torch, meta["dtype"].replace("torch.", "")))
    except ValueError as e:
        raise ConfigRefused(f"refused before any compute: {e}") from None
    return comm, rt


def fail_setup(rank: int, e: Exception, command: str = "prism run") -> None:
    """Exit 2 for a refused configuration, 3 for a handshake that broke."""
    from .handshake import ConfigRefused
    if isinstance(e, ConfigRefused):
        fail(rank, 2, str(e), command)
    fail(rank, 3, f"handshake failed (a rank died or is stalled?): {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", command)


def fail_run(rank: int, e: Exception, command: str = "prism run") -> None:
    """Called in an except block: exit 3 naming a peer that died or stalled, else exit 1
    with the traceback."""
    from .comm import PeerFailure
    if isinstance(e, PeerFailure):
        fail(rank, 3, str(e), command)
    import traceback
    traceback.print_exc()
    fail(rank, 1, f"{type(e).__name__}: {e}", command)


def join_process_group(args, rank: int, world: int, command: str = "prism run") -> None:
    """Set the threads and join the gloo group, or exit 3 naming the timeout."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout))
    except Exception as e:
        fail(rank, 3, f"could not join the process group within {args.timeout:g} s: {str(e).splitlines()[0]}",
             command)


def args_to_argv(args):
    """The command-line flags that reproduce `args` (without --nproc)."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    out = []
    for act in p._actions:
        if not act.option_strings or act.dest == "nproc":
            continue
        val = getattr(args, act.dest, act.default)
        if val == act.default:
            continue
        flag = act.option_strings[-1] if act.option_strings[-1].startswith("--") else act.option_strings[0]
        if isinstance(act, argparse._StoreTrueAction):
            out.append(flag)
        else:
            out += [flag, str(val)]
    return out


def spawn_torchrun(args):
    """Re-launch this command under torchrun with --nproc processes (loopback), in this
    process (torch.distributed.run), so that a failed rank's own exit status comes back
    (2 refused, 3 a peer died or stalled, 1 other) instead of torchrun's 1 and its
    ChildFailedError report: each rank has already said what went wrong on stderr."""
    import logging
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun
    rest = args_to_argv(args)
    cmd = ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "prism_kernels.distributed"] + rest
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)        # its "failed (exitcode: ...)" lines repeat the ranks' own
    try:
        torchrun(parse_args(cmd))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        for code in (3, 2):                 # a dead peer explains the others' failures
            if code in codes:
                return code
        return 1
    finally:
        quiet.setLevel(level)
    return 0


def main(argv=None, args=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if args is None:
        p = argparse.ArgumentParser(prog="prism run", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        args = p.parse_args(argv)
    return dispatch(args, validate, spawn_torchrun, run, "prism run")


def dispatch(args, check, spawn, run_rank, command: str) -> int:
    """With --nproc (no rank started yet): refuse a bad command line with exit 2 before any
    process starts, then spawn the ranks; inside a started rank: run it."""
    if args.nproc is not None and "RANK" not in os.environ:
        try:
            check(args)
        except ValueError as e:
            sys.stderr.write(f"{command}: error: refused before any compute: {e}\n")
            return 2
        return spawn(args)
    return run_rank(args)


def compare_with_single(entry, model, inputs, result, args, single_times=()):
    """Rank 0, after the distributed run: the stock model on this process alone, on the same
    input. {max_abs_diff of the head outputs, single_median_s, single_times_s}; the timings
    are the --interleave-single ones when taken, else --warmup + --repeat fresh runs."""
    from . import overlap
    model.set_attn_implementation("sdpa")
    try:
        times = list(single_times)
        _, head = entry.stock_forward(model, inputs)
        if not times:
            for it in range(args.warmup + args.repeat):
                t0 = time.perf_counter()
                _, head = entry.stock_forward(model, inputs)
                if it >= args.warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.set_attn_implementation(overlap.ATTN_NAME)
    got = result["head"]
    diff = float((got.float() - head.float()).abs().max()) if got.shape == head.shape else float("nan")
    return {"max_abs_diff": diff, "single_median_s": sorted(times)[len(times) // 2],
            "single_times_s": times}


def run(args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # refusals that need no communication: the same checks as before a spawn
    refuse_nproc_inside_rank(args, rank, world)
    try:
        validate(args, world=world)
        cfg = run_config(args, world)
    except ValueError as e:
        _fail(rank, 2, f"refused before any compute: {e}")

    import torch
    import torch.distributed as dist
    join_process_group(args, rank, world)

    from .handshake import handshake, input_digest
    from .runtime import floats_per_row
    from . import overlap

    try:
        entry, model = load_model(args)
        overlap.register()
        if args.mode == "single":
            model.set_attn_implementation("sdpa")
        else:
            model.set_attn_implementation(overlap.ATTN_NAME)
        inputs, n_tokens, error, digest = None, None, None, None
        if rank == 0 or cfg.input == "local":     # local: every rank holds the input itself
            try:
                if args.text is not None:
                    if not args.model:
                        raise ValueError("--text needs --model (a tokenizer)")
                    import transformers as tf
                    inputs = tf.AutoTokenizer.from_pretrained(args.model)(args.text, return_tensors="pt")["input_ids"]
                else:
                    inputs = entry.make_input(model.config, args.seq_len, seed=args.seed,
                                              pixels=resolve_pixels(getattr(args, "pixels", "auto"), entry))
                n_tokens = entry.n_tokens(model, inputs)
                if cfg.input == "local":
                    digest = input_digest(inputs)
            except Exception as e:
                error = str(e)
        settings = {"mode": cfg.mode, "prism": cfg.prism.to_dict() if cfg.prism else None,
                    "overlap": cfg.overlap, "gather": cfg.gather, "world": world, "wire_dtype": cfg.wire_dtype,
                    "input": cfg.input, "calibrate": bool(getattr(args, "calibrate", False))}
        meta = None if inputs is None else {"shape": list(inputs.shape), "dtype": str(inputs.dtype)}
    except Exception as e:
        _fail(rank, 2, f"refused before any compute: {type(e).__name__}: {e}")

    calibration = None
    try:
        n_tokens, meta = handshake(model, settings, n_tokens, error, timeout_s=args.timeout, input_meta=meta,
                                   input_digest=digest)
        if getattr(args, "calibrate", False) and cfg.mode != "single":
            from .calibrate import CALIBRATE_TOKENS, agree_speeds, time_one_block
            t = time_one_block(entry, model, max(1, min(CALIBRATE_TOKENS, -(-n_tokens // world))))
            calibration = agree_speeds(t)     # rank 0's decision: every rank builds the same plan
            cfg = run_config(args, world, weights=tuple(calibration["speeds"]))
        comm, rt = build_runtime(model, cfg, n_tokens, meta, args.timeout)
    except Exception as e:
        fail_setup(rank, e)

    times, waits, posts, single_times = [], [], [], []
    result = None
    rebalanced = []         # per warm-up run: the sizes it ran with, each rank's rows and compute
    bytes_run = 0           # the run whose bytes are checked: the first with the final plan
    try:
        for it in range(args.warmup + args.repeat):
            comm.barrier(f"start of run {it}")
            if args.interleave_single and cfg.mode != "single":
                if rank == 0:
                    model.set_attn_implementation("sdpa")
                    t0 = time.perf_counter()
                    entry.stock_forward(model, inputs)
                    if it >= args.warmup:
                        single_times.append(time.perf_counter() - t0)
                    model.set_attn_implementation(overlap.ATTN_NAME)
                comm.barrier(f"after the single-device run {it}")
            comm.wait_s = comm.post_s = 0.0
            t0 = time.perf_counter()
            result = rt.forward(inputs)
            dt = time.perf_counter() - t0
            if it >= args.warmup:
                times.append(dt)
                waits.append(comm.wait_s)
                posts.append(comm.post_s)
            if it == bytes_run:
                first_bytes = dict(comm.bytes.recv)
            # the first run's one-off costs (allocations, caches) are not proportional to the
            # rows: with two or more warm-up runs it is not measured
            if getattr(args, "rebalance", False) and (1 if args.warmup >= 2 else 0) <= it < args.warmup \
                    and rt.plan is not None:
                from .calibrate import agree_rebalance
                from .comm import ByteCounter
                # the rank's compute: the median layer's (its time less waiting and posting)
                # times the layers, so that one layer stalled by the machine does not decide
                step = agree_rebalance(rt.plan.sizes[rank], statistics.median(rt.layer_compute_s)
                                       * len(rt.layer_compute_s))
                new_cfg = run_config(args, world, weights=tuple(step["speeds"]))
                rebalanced.append(dict(step, sizes=list(rt.plan.sizes)))
                if list(new_cfg.plan(n_tokens, world, rt.entry.causal, rt.entry.roles(model.config)).sizes) \
                        != list(rt.plan.sizes):
                    rt.close()
                    cfg = new_cfg
                    comm, rt = build_runtime(model, cfg, n_tokens, meta, args.timeout, comm=comm)
                    comm.bytes = ByteCounter()
                    bytes_run = it + 1
        comm.barrier("end")
    except Exception as e:
        fail_run(rank, e)

    # bytes of one inference, per layer, checked against the cost model
    layer_bytes = {k[1]: v for k, v in first_bytes.items() if k[0] == "layer"}
    expected = rt.expected_layer_bytes() if rt.plan is not None else 0
    bytes_ok = all(v == expected for v in layer_bytes.values()) and \
        (rt.plan is None or len(layer_bytes) == (len(rt.layers) if rt.sources else 0) or expected == 0) and \
        first_bytes.get(("scatter", 0), 0) == rt.expected_startup_bytes()
    report = {"rank": rank, "world": world, "family": entry.model_type, "mode": cfg.mode,
              "averaging": rt.averaging, "wire": rt.wire, "wire_dtype": cfg.wire_dtype, "n_tokens": n_tokens,
              "sizes": list(rt.plan.sizes) if rt.plan is not None else None,
              "means": list(rt.plan.means) if rt.plan is not None and cfg.mode == "prism" else None,
              "layer_bytes": layer_bytes, "expected_layer_bytes": expected, "bytes_match_cost_model": bytes_ok,
              "startup_bytes": first_bytes.get(("scatter", 0), 0),
              "expected_startup_bytes": rt.expected_startup_bytes(),
              "gather_bytes": first_bytes.get(("gather", 0), 0),
              "times_s": times, "wait_s": waits, "post_s": posts}
    # every rank's bytes, collected on rank 0 (tiny)
    everyone = [None] * world
    try:
        dist.all_gather_object(everyone, report)
    except Exception as e:
        _fail(rank, 3, f"final report exchange failed: {e}")
    compare = None
    if rank == 0 and cfg.mode != "single" and not args.no_compare and result is not None:
        compare = compare_with_single(entry, model, inputs, result, args, single_times)
    if rank == 0:
        if args.json:
            summary = {k: report[k] for k in ("world", "family", "mode", "averaging", "wire", "wire_dtype",
                                              "n_tokens", "sizes", "means")}
            summary["input"] = cfg.input
            summary["startup_bytes_per_rank"] = [r["startup_bytes"] for r in everyone]
            summary["layer_bytes_per_rank"] = [r["layer_bytes"] for r in everyone]
            summary["speeds"] = list(cfg.prism.partition_weights) if cfg.prism is not None and \
                cfg.prism.partition_weights is not None else None
            summary["calibrated"] = calibration is not None
            if rebalanced:
                summary["rebalance_steps"] = rebalanced
            if calibration is not None:
                summary["calibration_times_s"] = calibration["times_s"]
            summary["bytes_match_cost_model"] = all(r["bytes_match_cost_model"] for r in everyone)
            if times:
                ts = sorted(times)
                summary["median_s"] = ts[len(ts) // 2]
                summary["times_s"] = times
                if single_times:
                    summary["single_times_s"] = single_times
                    summary["single_median_s"] = sorted(single_times)[len(single_times) // 2]
                # per rank: median time blocked waiting for peers (the rest is compute)
                med = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0
                summary["median_wait_s_per_rank"] = [med(r["wait_s"]) for r in everyone]
                # where each rank's time goes: its own forward, blocked waiting, posting
                # transfers (casts to the wire dtype, copies, isend/irecv); the rest is compute
                summary["median_total_s_per_rank"] = [med(r["times_s"]) for r in everyone]
                summary["median_post_s_per_rank"] = [med(r["post_s"]) for r in everyone]
            if compare is not None:
                summary["max_abs_diff_vs_single"] = compare["max_abs_diff"]
                summary["single_median_s"] = compare["single_median_s"]
                summary.setdefault("single_times_s", compare["single_times_s"])
            print(json.dumps(summary), flush=True)
        else:
            print(f"prism run: {entry.model_type} mode={cfg.mode} P={world} N={n_tokens} "
                  f"averaging={rt.averaging} wire={rt.wire}"
                  + (f" ({floats_per_row(model.config, rt.wire)} floats per row, {cfg.wire_dtype})"
                     if rt.wire else ""))
            for i, step in enumerate(rebalanced):
                print(f"  rebalance step {i + 1}: a warm-up run with sizes {step['sizes']}, compute "
                      + ", ".join(f"{c * 1e3:.1f}" for c in step["compute_s"]) + " ms per rank")
            if cfg.prism is not None and cfg.prism.partition_weights is not None:
                how = ("rebalanced from the warm-up runs" if rebalanced else
                       "measured: one block " + ", ".join(f"{t * 1e3:.2f}" for t in calibration["times_s"]) + " ms"
                       if calibration is not None else "stated")
                print(f"  speeds {[round(w, 3) for w in cfg.prism.partition_weights]} ({how}) -> "
                      f"partition sizes {list(rt.plan.sizes)}")
            for r in everyone:
                per = sorted(set(r["layer_bytes"].values()))
                print(f"  rank {r['rank']}: start-up bytes {r['startup_bytes']} ({cfg.input}; cost model "
                      f"{r['expected_startup_bytes']}), bytes received per layer {per} (cost model "
                      f"{r['expected_layer_bytes']}, match={r['bytes_match_cost_model']})")
            if times:
                print(f"  latency: median {sorted(times)[len(times) // 2] * 1e3:.1f} ms over {len(times)} runs")
            if result is not None:
                print(f"  output {tuple(result['head'].shape)}: {result['head'].reshape(-1)[:4].tolist()}")
            if compare is not None and times:
                med = sorted(times)[len(times) // 2]
                single = compare["single_median_s"]
                print(f"  max |{cfg.mode} - single| = {compare['max_abs_diff']:.3g} (head output), "
                      f"single-device latency {single * 1e3:.1f} ms, {cfg.mode} {med * 1e3:.1f} ms "
                      f"(speed-up x{single / med:.2f})")
        if args.out:
            import torch as _t
            _t.save({"result": result, "reports": everyone, "inputs": inputs}, args.out)
    # Leave without running gloo's destructors: tearing a gloo group down while a peer
    # has already left aborted about one run in three here ("terminate called without
    # an active exception", SIGABRT after correct output). Nothing is left to exchange.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

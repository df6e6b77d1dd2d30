"""`prism generate`: a Prism prefill on P processes, then greedy decoding on the last rank.

    prism generate --nproc 2 --family llama --size tiny --seq-len 32 --max-new-tokens 8 --decode prism --cr 4
    prism generate --nproc 2 --model DIR --prompt-file prompt.txt --max-new-tokens 20 --decode voltage -m 4
    torchrun --standalone --nproc-per-node 2 -m prism_kernels.distributed.generate ...   # the same

The prompt runs as `prism run --mode prism` does (Runtime.run_blocks: each rank its
partition, segment means of earlier partitions every layer). The last rank holds the
prompt's last token, so it computes the first new token; it then decodes alone. What its
per-layer cache holds, and what crosses the wire, depends on --decode:

  prism    its own K/V rows (rotated for rotary models) + the K/V of the means it received
           from earlier partitions during the prefill, with their counts (log-count bias)
           and positions: nothing is sent after the prefill or per token;
  voltage  every other rank sends its exact per-layer K/V rows once after the prefill
           ("post-prefill" bytes); the last rank then decodes alone from the full cache;
  exact    the caches stay where they are: per token and layer the last rank sends the new
           query to every other rank, which returns (partial output, log-sum-exp) over its
           own prompt rows; the last rank merges them with its own part.

Greedy decoding stops after --max-new-tokens tokens or the model's EOS token (not with
--ignore-eos). The other ranks wait for a one-integer message from the last rank: "a step
follows" before each exact-mode step, "done" at the end; they wait for it without a deadline
(the last rank may decode for longer than --timeout), a broken connection is still reported.
Exit codes as `prism run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

DECODES = ("prism", "exact", "voltage")
GEN_ATTN = "prism_generate"
IDLE_WAIT_S = 30 * 24 * 3600.0     # "no deadline" for a rank waiting while the last one decodes


# ------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser):
    from ..policy_args import add_policy_arguments
    from prism_kernels.models import MODEL_TYPES, SIZES
    p.add_argument("--nproc", type=int, default=None,
                   help="spawn torchrun with this many processes on this machine (loopback)")
    p.add_argument("--family", default=None, choices=MODEL_TYPES,
                   help="decoder family with random weights (gpt2, llama, qwen2)")
    p.add_argument("--size", default="tiny", choices=tuple(SIZES))
    p.add_argument("--model", default=None, help="a local Hugging Face decoder directory (save_pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=None, help="tokens of the random prompt")
    p.add_argument("--prompt-file", default=None, help="a text file, tokenised with --model's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (>= 1)")
    # no argparse choices: validate() names the argument and the choices in one line
    p.add_argument("--decode", default="prism", metavar="{prism,exact,voltage}",
                   help="what the last rank decodes from (module docstring)")
    p.add_argument("-m", "--num-means", type=int, default=None, help="segment means per partition (prefill)")
    p.add_argument("--cr", type=float, default=None, help="compression rate of the prefill (Eq. 16)")
    p.add_argument("--averaging", default="attention_input", choices=("attention_input", "block_input"))
    add_policy_arguments(p)
    p.add_argument("--wire-dtype", default="fp32", metavar="{fp32,fp16,bf16}",
                   help="element type of the prefill's per-layer exchange")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent peer is declared stalled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens tokens (default: stop after the model's EOS token)")
    p.add_argument("--json", action="store_true", help="the last rank prints one JSON line (no streaming)")


def _run_namespace(args) -> argparse.Namespace:
    """The `prism run` arguments of the prefill (prism mode), for launch.validate and run_config."""
    return argparse.Namespace(
        nproc=args.nproc, family=args.family, size=args.size, model=args.model, seed=args.seed,
        seq_len=args.seq_len, text=getattr(args, "prompt_text", None), mode="prism", num_means=args.num_means,
        cr=args.cr, averaging=args.averaging, anchors=args.anchors, segments=args.segments,
        anchor_budget=args.anchor_budget, anchor_topk=args.anchor_topk, anchor_score=args.anchor_score, speeds=None, partition_weights=None, calibrate=False, input="raw",
        no_overlap=args.no_overlap, wire_dtype=args.wire_dtype, gather="head", partitions=None,
        timeout=args.timeout, threads=args.threads, repeat=1, warmup=0, interleave_single=False,
        no_compare=True, out=None, json=args.json)


def validate(args, world=None):
    """Every check before any process starts (and again in each rank): raises launch.Refused
    naming the argument. The prefill's arguments are `prism run`'s checks (prism mode)."""
    from .launch import Refused, model_config, validate as validate_run
    if args.decode not in DECODES:
        raise Refused(f"--decode must be one of {', '.join(DECODES)}, got {args.decode!r}")
    if args.max_new_tokens is None:
        raise Refused("--max-new-tokens is required (tokens to generate, >= 1)")
    if args.max_new_tokens < 1:
        raise Refused(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt_file is not None:
        if not args.model:
            raise Refused("--prompt-file needs --model (a local model directory with a tokenizer)")
        if args.seq_len is not None:
            raise Refused("give --prompt-file or --seq-len, not both (the prompt sets the length)")
        if not os.path.isfile(args.prompt_file):
            raise Refused(f"--prompt-file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            args.prompt_text = f.read()
        if not args.prompt_text.strip():
            raise Refused(f"--prompt-file {args.prompt_file} is empty")
    if args.num_means is None and args.cr is None:
        raise Refused("the prefill needs -m/--num-means or --cr (--cr 1 for a prefill without means)")
    if args.decode == "prism" and getattr(args, "count_bias", "auto") not in ("auto", "log"):
        raise Refused(f"--count-bias {args.count_bias} with --decode prism: the decode cache keeps each "
                      "received row's count, not a matched row's bias per head; use --count-bias log "
                      "or --decode exact")
    if args.family is not None or args.model:
        entry, cfg = model_config(_run_namespace(args))
        if not entry.causal:
            what = f"--model {args.model} holds a {entry.model_type} model" if args.model else \
                f"--family {args.family}"
            raise Refused(f"{what}: prism generate needs a decoder (gpt2, llama, qwen2)")
    else:
        raise Refused("give --family (gpt2, llama, qwen2) or --model DIR")
    validate_run(_run_namespace(args), world=world)
    if args.seq_len is not None:
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit is not None and args.seq_len + args.max_new_tokens > limit:
            raise Refused(f"--seq-len {args.seq_len} + --max-new-tokens {args.max_new_tokens} exceeds the "
                          f"model's {limit} positions")


def build_parser():
    p = argparse.ArgumentParser(prog="prism generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def args_to_argv(args):
    """The flags that reproduce `args` (without --nproc)."""
    out = []
    for act in build_parser()._actions:
        if not act.option_strings or act.dest in ("nproc", "help"):
            continue
        val = getattr(args, act.dest, act.default)
        if val == act.default:
            continue
        flag = act.option_strings[-1]
        out += [flag] if isinstance(act, argparse._StoreTrueAction) else [flag, str(val)]
    return out


def main(argv=None, args=None) -> int:
    if args is None:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .launch import dispatch
    return dispatch(args, validate, _spawn, run, "prism generate")


def _spawn(args) -> int:
    """torchrun in this process (as launch.spawn_torchrun), so a rank's own status comes back."""
    import logging
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun
    cmd = ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "prism_kernels.distributed.generate"]
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        torchrun(parse_args(cmd + args_to_argv(args)))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in (3, 2) if c in codes), 1)
    finally:
        quiet.setLevel(level)
    return 0


# ------------------------------------------------------------------------------------------
# attention: the prefill's (with a capture of what the decoding rank keeps) and the decode's

_local = threading.local()


class DecodeCtx:
    """One layer of one decode step on the last rank (what the attention function reads)."""

    def __init__(self, gen: "Generator", index: int, pos: int):
        self.gen, self.index, self.pos = gen, index, pos


def generate_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from . import overlap
    ctx = overlap.current()
    if isinstance(ctx, DecodeCtx):
        return ctx.gen.attend(ctx, query, key, value, scaling)
    store = getattr(_local, "store", None)
    if store is not None and ctx is not None:
        # keep this layer's own rotated K/V, and the K/V the received rows became
        i = ctx.layer.index
        store[i] = {"key": key, "value": value, "remote": None}
        receive = ctx.receive_kv

        def receive_and_keep(dtype):
            got = receive(dtype)
            store[i]["remote"] = got
            return got
        ctx.receive_kv = receive_and_keep
    return overlap.prism_distributed_attention(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from . import overlap
    AttentionInterface.register(GEN_ATTN, generate_attention)
    AttentionMaskInterface.register(GEN_ATTN, overlap._no_mask)


class Generator:
    """One rank's prefill and decoding state."""

    def __init__(self, rt, decode: str):
        if decode == "prism" and rt.matched:
            raise ValueError(f"decode='prism' needs count_bias='log' (the cache keeps counts), got "
                             f"{rt.cfg.prism.count_bias!r}")
        self.rt, self.decode = rt, decode
        self.last = rt.world - 1
        self.cache = {}            # layer -> dict(keys, values, counts, positions) on the last rank
        self.local = {}            # layer -> (key, value) of this rank's prompt rows (exact mode)

    # -- prefill ---------------------------------------------------------------------
    def prefill(self, inputs):
        """Runs the Prism prefill; on the last rank returns the logits of the last prompt token."""
        import torch
        rt = self.rt
        _local.store = {}
        try:
            h = rt.run_blocks(inputs)
            store = _local.store
        finally:
            _local.store = None
        if self.rt.rank != self.last:
            self.local = {i: (s["key"], s["value"]) for i, s in store.items()}
            return None
        dev = rt.plan.device(rt.rank)
        own_pos = torch.tensor(dev.query_positions, dtype=torch.int64)
        for i, s in store.items():
            k, v = s["key"], s["value"]
            counts = torch.ones(k.shape[2], dtype=torch.int64)
            pos = own_pos
            if self.decode == "prism" and s["remote"] is not None:
                kr, vr, cr, pr, _ = s["remote"]
                k, v = torch.cat([kr, k], 2), torch.cat([vr, v], 2)
                # cr: the plan's [R], or [B, R] per sequence with data-dependent segments
                counts = torch.cat([cr, counts.expand(cr.shape[:-1] + counts.shape)], -1)
                pos = torch.cat([pr, pos])
            self.cache[i] = {"keys": k, "values": v, "counts": counts, "positions": pos}
        h = rt.entry.final_norm(rt.model, h[:, -1:])
        return rt.entry.head(rt.model, h)[:, -1]

    def send_exact_kv(self):
        """voltage: the other ranks' exact K/V rows of every layer to the last rank, once."""
        import torch
        rt = self.rt
        L = len(rt.layers)
        if rt.rank != self.last:
            payload = torch.stack([torch.stack(self.local[i], 1) for i in range(L)], 1)  # [B, L, 2, Hkv, n, d]
            rt.comm.start("K/V after the prefill", "post_prefill", 0, {self.last: payload}, {}).wait()
            return
        k0 = self.cache[0]["keys"]
        B, Hkv, _, d = k0.shape
        bufs = {j: torch.empty(B, L, 2, Hkv, rt.plan.sizes[j], d, dtype=k0.dtype) for j in range(self.last)}
        got = rt.comm.start("K/V after the prefill", "post_prefill", 0, {}, bufs).wait()
        for i in range(L):
            c = self.cache[i]
            c["keys"] = torch.cat([got[j][:, i, 0] for j in range(self.last)] + [c["keys"]], 2)
            c["values"] = torch.cat([got[j][:, i, 1] for j in range(self.last)] + [c["values"]], 2)
            c["counts"] = torch.ones(c["keys"].shape[2], dtype=torch.int64)
            c["positions"] = torch.arange(c["keys"].shape[2], dtype=torch.int64)

    # -- decode ----------------------------------------------------------------------
    def attend(self, ctx: DecodeCtx, query, key, value, scaling):
        """The new token's attention on the last rank: its cache (+ the new row) and, in
        exact mode, the other ranks' partial results over their prompt rows."""
        import torch
        import prism_kernels as pk
        from .overlap import merge_by_lse
        c = self.cache[ctx.index]
        c["keys"] = torch.cat([c["keys"], key], 2)
        c["values"] = torch.cat([c["values"], value], 2)
        c["counts"] = torch.cat([c["counts"], torch.ones(c["counts"].shape[:-1] + (key.shape[2],),
                                                         dtype=torch.int64)], -1)
        c["positions"] = torch.cat([c["positions"], torch.tensor([ctx.pos], dtype=torch.int64)])
        pend = None
        if self.decode == "exact" and self.last > 0:
            rt = self.rt
            B, H, n, d = query.shape
            bufs = {j: torch.empty(B, H, n, d + 1, dtype=torch.float32) for j in range(self.last)}
            # two exchanges, as the serving ranks post them (receive q, then send): gloo
            # matches by tag and Comm numbers its exchanges
            sent = rt.comm.start(f"decode layer {ctx.index}", "decode", ctx.index,
                                 {j: query.contiguous() for j in range(self.last)}, {})
            pend = rt.comm.start(f"decode layer {ctx.index}", "decode", ctx.index, {}, bufs)
        q_pos = torch.tensor([ctx.pos], dtype=torch.int64)
        out, lse = pk.prism_attention(query, c["keys"], c["values"], key_counts=c["counts"], causal=True,
                                      q_pos=q_pos, k_pos=c["positions"], scale=scaling, return_lse=True)
        if pend is not None:          # our part was computed while the queries travelled
            sent.wait()
            for j, t in sorted(pend.wait().items()):
                out, lse = merge_by_lse(out, lse, t[..., :-1].to(out.dtype), t[..., -1])
        return out.transpose(1, 2).contiguous(), None

    def signal(self, more: bool):
        """Last rank: tell the others a decode step follows (exact mode; counted with the
        step's bytes) or that decoding is over."""
        import torch
        flag = torch.tensor([1 if more else 0], dtype=torch.int64)
        self.rt.comm.start("decode control", "decode" if more else "control", -1,
                           {j: flag for j in range(self.last)}, {}).wait()

    def serve(self):
        """Ranks other than the last, after the prefill: wait for the last rank's messages
        until "done"; in exact mode answer every (step, layer) query with the attention over
        this rank's own prompt rows (all earlier than any new token)."""
        import torch
        import prism_kernels as pk
        rt = self.rt
        c = rt.model.config
        H, d = c.num_attention_heads, rt.entry.head_dim(c)
        k0 = self.local[0][0]
        while True:
            flag = torch.empty(1, dtype=torch.int64)
            pend = rt.comm.start("decode control", "decode", -1, {}, {self.last: flag})
            # no deadline: the last rank decodes alone for as long as it takes
            if int(pend.wait(timeout_s=IDLE_WAIT_S)[self.last][0]) == 0:
                rt.comm.bytes.recv[("decode", -1)] -= 8            # the final "done": not a step's
                rt.comm.bytes.recv[("control", -1)] += 8
                return
            for i in range(len(rt.layers)):
                q = rt.comm.start(f"decode layer {i}", "decode", i, {},
                                  {self.last: torch.empty(k0.shape[0], H, 1, d, dtype=k0.dtype)}).wait()[self.last]
                k, v = self.local[i]
                scale = getattr(rt.layers[i].attention, "scaling", None)
                o, l = pk.prism_attention(q, k, v, scale=scale, return_lse=True)
                rt.comm.start(f"decode layer {i}", "decode", i,
                              {self.last: torch.cat([o.float(), l.float().unsqueeze(-1)], -1)}, {}).wait()

    def step(self, token: int, pos: int):
        """One new token through the model on the last rank: the logits of the next one."""
        import torch
        from . import overlap
        rt = self.rt
        e, m = rt.entry, rt.model
        ids = torch.tensor([[token]], dtype=torch.int64)
        positions = torch.tensor([pos], dtype=torch.int64)
        h = e.embed(m, ids, positions)
        for layer in rt.layers:
            with overlap.use_layer(DecodeCtx(self, layer.index, pos)):
                h = e.run_block(m, layer.block, h, positions)
        return e.head(m, e.final_norm(m, h))[:, -1]

    def cache_rows(self):
        return self.cache[0]["keys"].shape[2] if self.cache else 0


# ------------------------------------------------------------------------------------------

def _eos_ids(model) -> set:
    """The model's EOS token ids (generation config, else config), as generate() stops on."""
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            return set(e) if isinstance(e, (list, tuple)) else {int(e)}
    return set()


def _fail(rank, code, msg):
    from .launch import fail
    fail(rank, code, msg, "prism generate")


def run(args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from .launch import (build_runtime, fail_run, fail_setup, join_process_group, load_model, refuse_nproc_inside_rank,
                         run_config)
    refuse_nproc_inside_rank(args, rank, world, "prism generate")
    try:
        validate(args, world=world)
        ns = _run_namespace(args)
        cfg = run_config(ns, world)
    except ValueError as e:
        _fail(rank, 2, f"refused before any compute: {e}")

    import torch
    import torch.distributed as dist
    join_process_group(args, rank, world, "prism generate")

    from .handshake import ConfigRefused, handshake
    from .runtime import _maybe_fault
    from . import overlap
    last = world - 1
    tokenizer = None
    try:
        entry, model = load_model(ns)
        overlap.register()
        register()
        model.set_attn_implementation(GEN_ATTN)
        if args.model and rank == last:
            try:
                import transformers as tf
                tokenizer = tf.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None          # no tokenizer saved: print token ids
        inputs, n_tokens, error = None, None, None
        if rank == 0:
            try:
                if ns.text is not None:
                    import transformers as tf
                    tok = tf.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
                    inputs = tok(ns.text, return_tensors="pt")["input_ids"]
                else:
                    inputs = entry.make_input(model.config, args.seq_len, seed=args.seed)
                n_tokens = entry.n_tokens(model, inputs)
            except Exception as e:
                error = str(e)
        settings = {"mode": "prism", "prism": cfg.prism.to_dict(), "overlap": cfg.overlap, "world": world,
                    "wire_dtype": cfg.wire_dtype, "input": cfg.input, "decode": args.decode,
                    "max_new_tokens": args.max_new_tokens}
        meta = None if inputs is None else {"shape": list(inputs.shape), "dtype": str(inputs.dtype)}
    except Exception as e:
        _fail(rank, 2, f"refused before any compute: {type(e).__name__}: {e}")
    try:
        n_tokens, meta = handshake(model, settings, n_tokens, error, timeout_s=args.timeout, input_meta=meta)
        if n_tokens + args.max_new_tokens > (getattr(model.config, "max_position_embeddings", None) or
                                             getattr(model.config, "n_positions", None) or 1 << 62):
            raise ConfigRefused(f"refused before any compute: the prompt's {n_tokens} tokens + --max-new-tokens "
                                f"{args.max_new_tokens} exceed the model's positions")
        comm, rt = build_runtime(model, cfg, n_tokens, meta, args.timeout)
    except Exception as e:
        fail_setup(rank, e, "prism generate")

    gen = Generator(rt, args.decode)
    K = args.max_new_tokens
    tokens, step_times = [], []
    stream = rank == last and not args.json
    printed = ""

    def show(tok_id):
        nonlocal printed
        if not stream:
            return
        if tokenizer is not None:     # print the text's new characters (a token may be part of one)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])
            printed = text
        else:
            sys.stdout.write(f"{tok_id} ")
        sys.stdout.flush()

    try:
        with torch.no_grad():
            comm.barrier("start of the prefill")
            t0 = time.perf_counter()
            logits = gen.prefill(inputs)
            if rank == last:
                tokens.append(int(logits.argmax(-1)[0]))
            t_prefill = time.perf_counter() - t0
            if stream:
                sys.stdout.write(f"prism generate: {entry.model_type} P={world} N={n_tokens} decode={args.decode}\n")
            show(tokens[-1] if tokens else None)
            t1 = time.perf_counter()
            if args.decode == "voltage":
                gen.send_exact_kv()
            t_post = time.perf_counter() - t1
            if rank == last:
                rows_after_prefill = gen.cache_rows()
                eos = set() if args.ignore_eos else _eos_ids(model)
                for s in range(1, K):
                    if tokens[-1] in eos:
                        break
                    if args.decode == "exact":
                        gen.signal(True)
                    _maybe_fault(rank, -1)      # tests: PRISM_FAULT=stall:rank=R:layer=-1 stalls decoding
                    t = time.perf_counter()
                    logits = gen.step(tokens[-1], n_tokens + s - 1)
                    tokens.append(int(logits.argmax(-1)[0]))
                    step_times.append(time.perf_counter() - t)
                    show(tokens[-1])
                gen.signal(False)
            else:
                gen.serve()
            if stream:
                sys.stdout.write("\n")
            comm.barrier("end")
    except Exception as e:
        fail_run(rank, e, "prism generate")

    b = comm.bytes.recv
    report = {"rank": rank,
              "startup_bytes": b.get(("scatter", 0), 0),
              "layer_bytes": {k[1]: v for k, v in b.items() if k[0] == "layer"},
              "post_prefill_bytes": sum(v for k, v in b.items() if k[0] == "post_prefill"),
              "decode_bytes": sum(v for k, v in b.items() if k[0] == "decode"),
              "control_bytes": sum(v for k, v in b.items() if k[0] == "control"),
              "prefill_s": t_prefill}
    everyone = [None] * world
    try:
        dist.all_gather_object(everyone, report)
    except Exception as e:
        _fail(rank, 3, f"final report exchange failed: {e}")
    if rank == last:
        c = model.config
        row_bytes = 2 * entry.num_kv_heads(c) * entry.head_dim(c) * next(model.parameters()).element_size()
        L = len(rt.layers)
        decode_total = sum(r["decode_bytes"] for r in everyone)
        summary = {
            "family": entry.model_type, "world": world, "n_tokens": n_tokens, "decode": args.decode,
            "sizes": list(rt.plan.sizes), "means": list(rt.plan.means), "tokens": tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None,
            "prefill_s": max(r["prefill_s"] for r in everyone), "post_prefill_s": t_post,
            "decode_step_s": step_times,
            "startup_bytes_per_rank": [r["startup_bytes"] for r in everyone],
            "prefill_layer_bytes_per_rank": [r["layer_bytes"] for r in everyone],
            "post_prefill_bytes": sum(r["post_prefill_bytes"] for r in everyone),
            # every byte any rank received while decoding, per generated token after the first
            "decode_bytes_total": decode_total,
            "decode_bytes_per_token": decode_total / len(step_times) if step_times else 0.0,
            "control_bytes": sum(r["control_bytes"] for r in everyone),
            "cache_rows_per_layer": rows_after_prefill, "full_cache_rows_per_layer": n_tokens,
            "cache_bytes": rows_after_prefill * row_bytes * L, "full_cache_bytes": n_tokens * row_bytes * L,
        }
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            med = sorted(step_times)[len(step_times) // 2] if step_times else 0.0
            per = [sorted(set(r["layer_bytes"].values())) for r in everyone]
            print(f"  prefill {summary['prefill_s'] * 1e3:.1f} ms; decode median {med * 1e3:.2f} ms/token "
                  f"over {len(step_times)} steps")
            print(f"  bytes: start-up per rank {summary['startup_bytes_per_rank']}, prefill per layer per rank "
                  f"{per}, post-prefill {summary['post_prefill_bytes']}, per token "
                  f"{summary['decode_bytes_per_token']:g}")
            print(f"  last rank's cache after the prefill: {rows_after_prefill} rows per layer, "
                  f"{summary['cache_bytes']} bytes (a full cache: {n_tokens} rows, {summary['full_cache_bytes']} bytes)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)    # as prism run: no gloo teardown while a peer may have left


if __name__ == "__main__":
    sys.exit(main())

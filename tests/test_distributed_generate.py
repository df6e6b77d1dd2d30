"""`prism generate` (prism_kernels/distributed/generate.py) on 2 loopback processes.

The tokens the last rank generates greedily after a Prism prefill equal the one-process
simulation's `model.generate` (prism_kernels.hf.enable_prism, same model, prompt, CR and
decode mode); at CR = 1 they equal stock greedy generation. Bytes: none per token in prism
and voltage modes; voltage's one transfer after the prefill is the other partition's K/V
rows of every layer. Misuse is refused before any process starts (exit 2, argument named).
"""
from __future__ import annotations

import json

import pytest
import torch

import prism_kernels.hf as phf
from prism_kernels.distributed import generate as dgen
from prism_kernels.models import build_model, lookup
from test_distributed import launch

N, NEW = 12, 5


def _run(family, decode, cr, extra=()):
    argv = ["--family", family, "--size", "tiny", "--seq-len", str(N), "--max-new-tokens", str(NEW),
            "--decode", decode, "--cr", str(cr), "--json", "--timeout", "30", *extra]
    res, _ = launch(2, argv, module="prism_kernels.distributed.generate", timeout=120)
    for r, (rc, out, err) in enumerate(res):
        assert rc == 0, f"rank {r} rc={rc}\n{out}\n{err}"
    assert res[0][1].strip() == ""          # only the decoding (last) rank reports
    return json.loads(res[1][1].strip().splitlines()[-1])


def _simulated(family, decode, cr, **prism_kw):
    """The one-process simulation's greedy tokens; cr None: the stock model."""
    model = build_model(family, "tiny", seed=0)
    ids = lookup(family).make_input(model.config, N, seed=0)
    if cr is not None:
        phf.enable_prism(model, num_partitions=2, compression_rate=cr, decode=decode, **prism_kw)
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, N:].tolist(), model.config


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("decode,cr", [("prism", 3), ("voltage", 3), ("prism", 1)])
def test_tokens_equal_simulation(family, decode, cr):
    got = _run(family, decode, cr)
    want, config = _simulated(family, decode, cr)
    assert got["tokens"] == want
    if cr == 1:
        assert got["tokens"] == _simulated(family, decode, None)[0]      # stock greedy generation
    assert got["decode_bytes_total"] == 0 and got["decode_bytes_per_token"] == 0
    entry = lookup(family)
    row = 2 * entry.num_kv_heads(config) * entry.head_dim(config) * 4           # K and V, fp32
    layers = config.num_hidden_layers
    n0, n1 = got["sizes"]
    assert n0 + n1 == N
    if decode == "voltage":
        # rank 0's exact K/V rows of every layer, once
        assert got["post_prefill_bytes"] == layers * n0 * row
        assert got["cache_rows_per_layer"] == N
    else:
        assert got["post_prefill_bytes"] == 0
        assert got["cache_rows_per_layer"] == n1 + got["means"][0]     # own rows + received means
    assert got["full_cache_bytes"] == layers * N * row
    assert got["cache_bytes"] == layers * got["cache_rows_per_layer"] * row
    assert len(got["decode_step_s"]) == len(got["tokens"]) - 1 and 1 <= len(got["tokens"]) <= NEW
    assert got["control_bytes"] == 8                                # the final "done" to rank 0


@pytest.mark.parametrize("family,extra,kw", [
    ("qwen2", [], {}),                                                     # rotary, K/V biases, GQA
    ("llama", ["--averaging", "block_input", "--no-overlap"], {"averaging": "block_input"}),
    # data-dependent segments: per-layer, per-sequence counts kept in the decoding cache
    ("llama", ["--anchors", "special+topk", "--anchor-score", "key_dev", "--segments", "content_sse"],
     {"anchors": "special+topk", "anchor_score": "key_dev", "segments": "content_sse"}),
    ("gpt2", ["--segments", "kmeans", "--no-overlap"], {"segments": "kmeans"}),
])
def test_other_settings_equal_simulation(family, extra, kw):
    assert _run(family, "prism", 3, extra)["tokens"] == _simulated(family, "prism", 3, **kw)[0]


def test_exact_equals_voltage_and_counts_its_bytes():
    got = _run("llama", "exact", 3)
    assert got["tokens"] == _simulated("llama", "exact", 3)[0]
    config = build_model("llama", "tiny").config
    entry = lookup("llama")
    H, d = config.num_attention_heads, entry.head_dim(config)
    # per token and layer: the query to rank 0 (H*d floats), its output and lse back (H*(d+1));
    # per token: the "a step follows" integer to rank 0
    assert got["decode_bytes_per_token"] == config.num_hidden_layers * (H * d + H * (d + 1)) * 4 + 8
    assert got["post_prefill_bytes"] == 0


def test_idle_rank_waits_longer_than_timeout_while_the_last_rank_decodes():
    """Decoding is the last rank's alone and may take longer than --timeout: the other rank
    waits for its "done" without a deadline (here decoding stalls 3 s against --timeout 1)."""
    argv = ["--family", "llama", "--seq-len", str(N), "--max-new-tokens", "3", "--decode", "prism",
            "--cr", "3", "--json", "--timeout", "1", "--ignore-eos"]
    res, _ = launch(2, argv, module="prism_kernels.distributed.generate", timeout=120,
                    env_per_rank={1: {"PRISM_FAULT": "stall:rank=1:layer=-1:seconds=3"}})
    for r, (rc, out, err) in enumerate(res):
        assert rc == 0, f"rank {r} rc={rc}\n{out}\n{err}"
    got = json.loads(res[1][1].strip().splitlines()[-1])
    assert len(got["tokens"]) == 3 and sum(got["decode_step_s"]) < 1.0    # the stall is before the timer


BASE = ["--nproc", "2", "--family", "llama", "--seq-len", "8", "--max-new-tokens", "3", "--cr", "2"]


def _with(**changes):
    argv = list(BASE)
    for flag, val in changes.items():
        flag = "--" + flag.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if val is not None:
            argv += [flag, str(val)]
    return argv


@pytest.mark.parametrize("argv,named", [
    (_with(family="bert"), "--family bert"),
    (_with(max_new_tokens=0), "--max-new-tokens"),
    (_with(max_new_tokens=None), "--max-new-tokens"),
    (_with(decode="beam"), "--decode"),
    (_with(cr=None), "--cr"),
    (_with(cr=0.5), "--cr"),
    (_with(nproc=9), "--nproc"),
    (_with(seq_len=None, prompt_file="p.txt"), "--prompt-file"),
    (_with(family="gpt2", seq_len=1020, max_new_tokens=10), "--max-new-tokens"),  # 1024 positions
    (_with(count_bias="matched"), "--count-bias matched"),      # the prism decode cache keeps counts
])
def test_misuse_refused_before_any_process(argv, named, capsys):
    assert dgen.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prism generate: error: refused before any compute:")
    assert named in err[0]


def test_cli_registers_generate():
    from prism_kernels.cli import main
    assert main(["generate"] + _with(decode="nope")) == 2


def test_saved_model_with_prompt_file_streams_text(tmp_path):
    """--model DIR --prompt-file F: the prompt is tokenised with the model's tokenizer, the
    last rank prints the generated text (a tiny word-level tokenizer, made here: no hub) and
    stops after the model's EOS token, as generate() does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    model = build_model("gpt2", "tiny", seed=0)
    V = model.config.vocab_size
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    prompt = " ".join(f"w{(7 * i + 3) % V}" for i in range(N))
    (tmp_path / "p.txt").write_text(prompt)
    ids = fast(prompt, return_tensors="pt")["input_ids"]
    ref = build_model("gpt2", "tiny", seed=0)
    ref.generation_config.eos_token_id = None
    phf.enable_prism(ref, num_partitions=2, num_means=2, decode="prism")
    free = ref.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, N:].tolist()
    stop = free[2]                          # make the third token the EOS: generation stops there
    want = free[:free.index(stop) + 1]
    model.generation_config.eos_token_id = stop
    model.save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    argv = ["--model", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens",
            str(NEW), "--decode", "prism", "-m", "2", "--timeout", "30"]
    res, _ = launch(2, argv, module="prism_kernels.distributed.generate", timeout=120)
    for r, (rc, out, err) in enumerate(res):
        assert rc == 0, f"rank {r} rc={rc}\n{out}\n{err}"
    lines = res[1][1].splitlines()
    assert lines[0].startswith("prism generate: gpt2 P=2 N=12 decode=prism")
    assert lines[1] == fast.decode(want, skip_special_tokens=True)
    assert "per token 0" in res[1][1]

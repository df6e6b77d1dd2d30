"""The `prism` command line tool and `prism costs`."""
import importlib
import json
import subprocess
import sys

import pytest
import torch

from prism_kernels import __version__, cli
from prism_kernels.costs import estimate


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_no_arguments_prints_help_exit_2(capsys):
    rc, out, err = run_cli(capsys)
    assert rc == 2
    assert "usage: prism" in err and "costs" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_console_entry_point_no_args():
    p = subprocess.run([sys.executable, "-m", "prism_kernels.cli"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "usage: prism" in p.stderr


def test_commands_list_and_missing_modules_skipped(monkeypatch):
    assert cli.COMMANDS == ["costs", "demo", "run", "generate", "eval"]
    monkeypatch.setattr(cli, "COMMANDS", ["costs", "zz_not_written_yet"])
    parser = cli.build_parser()
    args = parser.parse_args(["costs", "--model", "gpt2", "--partitions", "2", "--means", "1"])
    assert args.command == "costs"
    with pytest.raises(SystemExit):
        parser.parse_args(["zz_not_written_yet"])


def test_broken_command_module_is_not_hidden(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "prism_kernels.commands.zz_broken":
            raise ImportError("zz_broken needs a missing dependency")
        return real_import(name, *a, **k)

    real_find = importlib.util.find_spec
    monkeypatch.setattr(cli, "COMMANDS", ["costs", "zz_broken"])
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: object() if name.endswith("zz_broken") else real_find(name, *a))
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="missing dependency"):
        cli.build_parser()


def test_costs_startup_bytes(capsys):
    rc, out, err = run_cli(capsys, "costs", "--model", "bert-base", "--seq-len", "256", "--partitions", "2",
                           "--cr", "10")
    assert rc == 0, err
    assert ("start-up, once per inference (rank 0 -> each device): raw input (int64) 0 B, 1.0 KiB; "
            "fp32 hidden states 0 B, 384.0 KiB") in out, out
    rc, out, err = run_cli(capsys, "costs", "--model", "vit-b16", "--partitions", "2", "--cr", "10",
                           "--input-dtype", "uint8", "--json")
    d = json.loads(out)
    assert d["startup_input_dtype"] == "uint8" and d["startup_raw_bytes_devices"] == [0, 7 * 16 * 224 * 3]


def test_costs_json_matches_api(capsys):
    rc, out, err = run_cli(capsys, "costs", "--model", "gpt2", "--seq-len", "256", "--partitions", "2",
                           "--cr", "10", "--json")
    assert rc == 0
    d = json.loads(out)
    r = estimate("gpt2", 256, 2, compression_rate=10)
    for key in ("single_gflops", "voltage_gflops_per_device", "prism_gflops_per_device",
                "voltage_tokens_per_layer", "prism_tokens_per_layer", "compression_rate",
                "comm_speedup_pct", "comp_speedup_pct"):
        assert d[key] == pytest.approx(getattr(r, key))
    assert d["prism_gflops_per_device"] == pytest.approx(32.64, rel=0.015)     # paper, Table VI
    # 13 means of 768 floats, each with its int32 count (the default segments are chosen per layer)
    assert d["dtype"] == "fp32" and d["prism_bytes_devices"] == [13 * (768 * 4 + 4)] * 2


def test_costs_anchor_topk_decides_whether_counts_travel(capsys):
    """`prism costs` takes the policy flags of `prism run`: with no top-k anchor and equal
    runs the rows leave no choice, so no count travels (13 means of 768 floats, as above
    but without their 4-byte counts)."""
    def bytes_(*extra):
        rc, out, err = run_cli(capsys, "costs", "--model", "gpt2", "--seq-len", "256", "--partitions", "2",
                               "--cr", "10", "--json", *extra)
        assert rc == 0, err
        return json.loads(out)["prism_bytes_devices"]
    assert bytes_("--anchor-topk", "3") == [13 * (768 * 4 + 4)] * 2
    assert bytes_("--anchor-topk", "0", "--segments", "runs") == [13 * 768 * 4] * 2


def test_costs_dtype_changes_bytes(capsys):
    rc, out, _ = run_cli(capsys, "costs", "--model", "bert-base", "--partitions", "2", "--means", "1",
                         "--dtype", "fp16", "--json")
    d = json.loads(out)
    # the default for a text encoder: one matched row (a key and a value per head, 12 x 64
    # each, and 12 biases); no count on the wire
    assert d["prism_bytes_devices"] == [(2 * 768 + 12) * 2] * 2
    assert d["voltage_bytes_devices"] == [128 * 768 * 2] * 2
    # --wire-dtype, the name shared with `prism run`: bf16 halves fp32's bytes too
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        rc, out, _ = run_cli(capsys, "costs", "--model", "bert-base", "--partitions", "2", "--means", "1",
                             "--wire-dtype", dtype, "--json")
        d = json.loads(out)
        assert rc == 0 and d["wire_dtype"] == dtype and d["prism_bytes_devices"] == [(2 * 768 + 12) * size] * 2
    # the paper's log-count bias: one attention-input row of 768
    rc, out, _ = run_cli(capsys, "costs", "--model", "bert-base", "--partitions", "2", "--means", "1",
                         "--count-bias", "log", "--json")
    assert rc == 0 and json.loads(out)["prism_bytes_devices"] == [768 * 4] * 2


def test_costs_human_table(capsys):
    # the paper's plain means (its receiver projects the received means)
    rc, out, _ = run_cli(capsys, "costs", "--model", "vit-b16", "--partitions", "2", "--means", "10",
                         "--anchors", "none")
    assert rc == 0
    lines = out.splitlines()
    for label in ("single device", "Voltage", "Prism"):
        assert any(l.startswith(label) for l in lines), label
    prism = next(l for l in lines if l.startswith("Prism")).split()
    assert "17.53" in prism and "9.85" in prism            # paper: 17.54 /device, CR 9.90 (rounded PDPLC)
    assert "FLOPs counted" in out and "attention core" in out
    # the default for ViT: rows matched at the [CLS] query, keys and values on the wire, which
    # the receiver does not project: 12 layers x 2 x 10 rows x 768 x 1536 less per device
    rc, out, _ = run_cli(capsys, "costs", "--model", "vit-b16", "--partitions", "2", "--means", "10")
    prism = next(l for l in out.splitlines() if l.startswith("Prism")).split()
    assert rc == 0 and "17.24" in prism, prism


def test_costs_causal_mentions_saving(capsys):
    rc, out, _ = run_cli(capsys, "costs", "--model", "gpt2", "--seq-len", "30", "--partitions", "3",
                         "--means", "2")
    assert "earlier partitions" in out and "[0, 2, 4]" in out


def test_costs_config_file_and_model_type(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
                               "vocab_size": 100, "n_positions": 128}))
    rc, out, _ = run_cli(capsys, "costs", "--model", str(cfg), "--seq-len", "40", "--partitions", "2",
                         "--means", "4", "--json")
    d = json.loads(out)
    assert rc == 0 and d["num_layers"] == 2 and d["hidden_size"] == 64 and d["kind"] == "causal"


def test_costs_uneven_sizes_and_model_types(capsys):
    rc, out, _ = run_cli(capsys, "costs", "--model", "gpt2", "--seq-len", "150", "--sizes", "100,50",
                         "--means", "5", "--json")
    d = json.loads(out)
    assert rc == 0 and d["partition_sizes"] == [100, 50] and d["prism_tokens_devices"] == [5, 5]
    rc, out, _ = run_cli(capsys, "costs", "--model", "qwen2", "--seq-len", "64", "--weights", "3,1",
                         "--cr", "4", "--json")
    d = json.loads(out)
    assert rc == 0 and d["partition_sizes"] == [48, 16] and d["means_per_partition"] == [12, 4]
    assert d["kind"] == "causal" and d["prism_wire"] == "kv"
    for model in ("roberta-base", "qwen2-0.5b"):
        rc, out, _ = run_cli(capsys, "costs", "--model", model, "--partitions", "2", "--cr", "10")
        assert rc == 0 and "Prism" in out


def test_costs_paper(capsys):
    rc, out, _ = run_cli(capsys, "costs", "--paper", "--json")
    rows = json.loads(out)
    figures = {(r["setting"], r["figure"]): r for r in rows}
    assert figures[("vit-b16 N=197", "single GFLOPs")]["paper"] == 35.15
    assert figures[("gpt2 N=256", "Voltage P=3 GFLOPs/device")]["paper"] == 26.74
    for r in rows:
        if "GFLOPs" in r["figure"] or "speed-up" in r["figure"]:
            assert abs(r["diff_pct"]) <= 1.5, r
    rc, out, _ = run_cli(capsys, "costs", "--paper")
    assert rc == 0 and "35.15" in out and "22.40" in out and "32.64" in out


BAD = [
    (["--model", "gpt2", "--seq-len", "4", "--partitions", "5", "--means", "1"], "--partitions", "<= the sequence length"),
    (["--model", "gpt2", "--partitions", "0", "--means", "1"], "--partitions", ">= 1"),
    (["--model", "gpt2", "--partitions", "2", "--means", "0"], "--means", ">= 1"),
    (["--model", "gpt2", "--seq-len", "16", "--partitions", "3", "--means", "6"], "--means",
     "smallest partition size (5 tokens"),
    (["--model", "gpt2", "--partitions", "2", "--cr", "0.5"], "--cr", ">= 1"),
    (["--model", "gpt2", "--partitions", "2", "--cr", "nan"], "--cr", ">= 1"),
    (["--model", "nope", "--partitions", "2", "--means", "1"], "--model", "unknown model 'nope'"),
    (["--model", "gpt2", "--partitions", "2"], "--means --cr", "required"),
    (["--model", "gpt2", "--partitions", "2", "--means", "1", "--cr", "2"], "--cr", "not allowed"),
    (["--partitions", "2", "--means", "1"], "--model", "required"),
    (["--model", "gpt2", "--means", "1"], "--partitions", "required"),
    (["--model", "vit-b16", "--seq-len", "100", "--partitions", "2", "--means", "1"], "--seq-len", "197"),
    (["--model", "gpt2", "--seq-len", "0", "--partitions", "1", "--means", "1"], "--seq-len", ">= 1"),
    (["--model", "gpt2", "--seq-len", "5000", "--partitions", "2", "--means", "1"], "--seq-len", "<= 1024"),
    (["--model", "llama", "--partitions", "2", "--means", "1"], "--seq-len", "required"),
    (["--paper", "--model", "gpt2"], "--paper", "no setting arguments"),
    (["--model", "gpt2", "--seq-len", "16", "--sizes", "10,5", "--means", "1"], "--sizes", "sum to n_tokens=16"),
    (["--model", "gpt2", "--seq-len", "16", "--sizes", "10,6", "--means", "7"], "--means",
     "smallest partition size (6 tokens"),
    (["--model", "gpt2", "--seq-len", "16", "--partitions", "2", "--sizes", "10,6", "--means", "1"], "--sizes",
     "not allowed with argument --partitions"),
    (["--model", "gpt2", "--seq-len", "16", "--weights", "1,x", "--means", "1"], "--weights", "could not convert"),
    (["--model", "gpt2", "--partitions", "2", "--means", "x"], "--means", "invalid int"),
    (["--model", "gpt2", "--partitions", "2", "--means", "1", "--wire-dtype", "fp4"], "--wire-dtype",
     "invalid choice: 'fp4'"),
    (["--model", "gpt2", "--partitions", "2", "--cr", "10", "--anchor-topk", "-2"], "--anchor-topk",
     "'auto' or an integer >= 0, got -2"),
]


@pytest.mark.parametrize("argv,arg,rule", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_costs_bad_input_exit_2(capsys, argv, arg, rule):
    with pytest.raises(SystemExit) as e:
        cli.main(["costs", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert arg in err and rule in err, err


# ---------------------------------------------------------------- prism run: refused before any process

RUN_BAD = [
    # (argv, the argument named, the rule)
    (["--nproc", "2", "--cr", "4"], "--seq-len", "required for the bert family"),
    (["--nproc", "2", "--family", "gpt2", "--cr", "4"], "--seq-len", "required for the gpt2 family"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "0"], "--cr", "finite number >= 1"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "nan"], "--cr", "finite number >= 1"),
    (["-P", "3", "--nproc", "2", "--seq-len", "8", "--cr", "4"], "--partitions 3",
     "but the world size is 2 (--nproc 2): they must be equal"),
    (["--nproc", "2", "--text", "hello", "--cr", "4"], "--text", "needs --model"),
    (["--nproc", "0", "--seq-len", "8", "--cr", "4"], "--nproc", "between 1 and 8"),
    (["--nproc", "9", "--seq-len", "8", "--cr", "4"], "--nproc", "between 1 and 8"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--timeout", "0"], "--timeout", "> 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--timeout", "nan"], "--timeout", "> 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--threads", "0"], "--threads", ">= 1"),
    (["--nproc", "2", "--seq-len", "100000", "--cr", "4"], "--seq-len", "<= 512 (max positions of bert)"),
    (["--nproc", "2", "--family", "gpt2", "--seq-len", "2000", "--cr", "4"], "--seq-len",
     "<= 1024 (max positions of gpt2)"),
    (["--nproc", "2", "--family", "roberta", "--seq-len", "513", "--cr", "4"], "--seq-len", "<= 512"),
    (["--nproc", "2", "--seq-len", "0", "--cr", "4"], "--seq-len", ">= 1"),
    (["--nproc", "3", "--seq-len", "2", "-m", "1"], "--seq-len 2", "3 partitions (world size) for 2 tokens"),
    (["--nproc", "2", "--model", "/nonexistent", "--seq-len", "8", "--cr", "4"], "--model /nonexistent",
     "directory does not exist"),
    (["--nproc", "2", "--seq-len", "8", "-m", "3", "--cr", "8"], "-m/--num-means 3 and --cr 8",
     "exactly one of num_means"),
    (["--nproc", "2", "--seq-len", "8", "-m", "0"], "-m/--num-means", ">= 1"),
    (["--nproc", "2", "--seq-len", "8"], "-m/--num-means or --cr", "prism mode needs"),
    (["--nproc", "2", "--seq-len", "8", "--mode", "voltage", "--cr", "4"], "--cr", "--mode prism only"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--repeat", "0"], "--repeat", "--repeat must be >= 1"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--warmup", "-1"], "--warmup", ">= 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--anchor-topk", "-1"], "--anchor-topk",
     "'auto' or an integer >= 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--anchor-topk", "two"], "--anchor-topk",
     "'auto' or an integer >= 0, got 'two'"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--partition-weights", "1,x"], "--partition-weights",
     "comma-separated numbers"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--partition-weights", "1,2,3"], "partition_weights",
     "one weight per partition (2)"),
    (["--nproc", "2", "--family", "vit", "--cr", "4", "--seq-len", "5"], "--seq-len", "fixed by its image size"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "1,0.5,2"], "--speeds 1,0.5,2",
     "one weight per partition (2), got 3"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "1,0"], "--speeds", "finite numbers > 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "1,-0.5"], "--speeds", "finite numbers > 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "1,inf"], "--speeds", "finite numbers > 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "fast,slow"], "--speeds",
     "comma-separated numbers"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--partition-weights", "1,0"], "--partition-weights",
     "finite numbers > 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--calibrate", "--speeds", "1,1"],
     "--calibrate and --speeds", "give one"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--calibrate", "--partition-weights", "1,1"],
     "--calibrate and --partition-weights", "give one"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--speeds", "1,1", "--partition-weights", "1,1"],
     "--partition-weights is the older name of --speeds", "give one"),
    (["--nproc", "2", "--seq-len", "8", "--mode", "single", "--calibrate"], "--calibrate",
     "single mode has no partitions"),
    (["--nproc", "2", "--seq-len", "8", "--mode", "single", "--speeds", "1,2"], "--speeds",
     "single mode has no partitions"),
    (["--nproc", "2", "--seq-len", "8", "--mode", "single", "--rebalance", "--warmup", "1"], "--rebalance",
     "single mode has no partitions"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--rebalance"], "--rebalance",
     "needs --warmup >= 1, got --warmup 0"),
    (["--nproc", "2", "--seq-len", "8", "--cr", "4", "--wire-dtype", "fp8"], "--wire-dtype",
     "must be one of fp32, fp16, bf16, got 'fp8'"),
    (["--nproc", "2", "--seq-len", "8", "--mode", "voltage", "--wire-dtype", "float16"], "--wire-dtype",
     "must be one of fp32, fp16, bf16, got 'float16'"),
    (["--nproc", "2", "--family", "bert", "--seq-len", "8", "--cr", "2", "--pixels", "uint8"], "--pixels uint8",
     "applies to image models, not to the bert family"),
]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if `prism run` would start any process."""
    from prism_kernels.distributed import launch

    def boom(*a, **k):
        raise AssertionError("a process was started for a refused command line")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch, "spawn_torchrun", boom)
    monkeypatch.setattr(launch, "run", boom)
    monkeypatch.setattr(launch.subprocess, "call", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("argv,arg,rule", RUN_BAD, ids=[" ".join(b[0]) for b in RUN_BAD])
def test_run_refused_before_any_process(capsys, no_launch, argv, arg, rule):
    rc, out, err = run_cli(capsys, "run", *argv)
    assert rc == 2, err
    assert err.startswith("prism run: error: refused before any compute: ") and err.count("\n") == 1, err
    assert arg in err and rule in err, err
    assert "Traceback" not in err and out == ""


def test_run_model_dir_without_config(tmp_path, capsys, no_launch):
    rc, _, err = run_cli(capsys, "run", "--nproc", "2", "--model", str(tmp_path), "--seq-len", "8", "--cr", "4")
    assert rc == 2 and f"--model {tmp_path}: the directory has no config.json" in err, err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    rc, _, err = run_cli(capsys, "run", "--nproc", "2", "--model", str(tmp_path), "--seq-len", "8", "--cr", "4")
    assert rc == 2 and f"--model {tmp_path}: unsupported model type 't5'" in err, err
    assert err.count("\n") == 1


def test_run_model_dir_family_and_text(tmp_path, capsys, no_launch):
    from prism_kernels.models import lookup
    lookup("gpt2").build_config("tiny").save_pretrained(tmp_path)      # config only: no weights needed
    rc, _, err = run_cli(capsys, "run", "--nproc", "2", "--model", str(tmp_path), "--family", "bert",
                         "--seq-len", "8", "--cr", "4")
    assert rc == 2 and "--family bert but" in err and "holds a gpt2 model" in err, err
    rc, _, err = run_cli(capsys, "run", "--nproc", "2", "--model", str(tmp_path), "--cr", "4")
    assert rc == 2 and "--seq-len is required for the gpt2 family" in err, err
    rc, _, err = run_cli(capsys, "run", "--nproc", "2", "--model", str(tmp_path), "--text", "hi",
                         "--seq-len", "4", "--cr", "4")
    assert rc == 2 and "give --text or --seq-len, not both" in err, err


def test_run_argparse_errors_exit_2(capsys, no_launch):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--nproc", "2", "--seq-len", "8", "--cr", "abc"])
    assert e.value.code == 2 and "argument --cr: invalid float value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--nproc", "2", "--seq-len", "8", "--cr", "2", "--input", "pixels"])
    assert e.value.code == 2 and "argument --input: invalid choice: 'pixels'" in capsys.readouterr().err


def test_run_sends_8_bit_pixels_by_default():
    """--pixels auto (the default): an image model's random input is 8-bit pixels (a quarter
    of the start-up bytes of fp32 pixel_values); a text model takes none."""
    from prism_kernels.distributed import launch
    from prism_kernels.models import lookup
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "--family", "vit", "-m", "1"])
    assert args.pixels == "auto"
    assert launch.resolve_pixels(args.pixels, lookup("vit")) == "uint8"
    assert launch.resolve_pixels("float", lookup("vit")) == "float"
    assert launch.resolve_pixels("auto", lookup("bert")) == "float"
    x = lookup("vit").make_input(lookup("vit").build_config("tiny"), pixels=launch.resolve_pixels("auto", lookup("vit")))
    assert x.dtype == torch.uint8


def test_run_local_input_and_pixels_reach_the_ranks():
    from prism_kernels.distributed import launch
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "--family", "vit", "-m", "1", "--input", "local",
                                          "--pixels", "uint8"])
    argv = launch.args_to_argv(args)
    assert argv[argv.index("--input") + 1] == "local" and argv[argv.index("--pixels") + 1] == "uint8"
    assert launch.run_config(args, 2).input == "local"


def test_run_input_and_calibrate_reach_the_ranks():
    from prism_kernels.distributed import launch
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "--seq-len", "9", "-m", "1", "--input", "hidden",
                                          "--calibrate"])
    argv = launch.args_to_argv(args)
    assert argv[argv.index("--input") + 1] == "hidden" and "--calibrate" in argv
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "--seq-len", "9", "-m", "1", "--speeds", "1,0.5"])
    argv = launch.args_to_argv(args)
    assert argv[argv.index("--speeds") + 1] == "1,0.5" and "--input" not in argv      # raw: the default
    assert launch.run_config(args, 2).prism.partition_weights == (1.0, 0.5)
    assert launch.run_config(args, 2).input == "raw"


def test_run_rank_refuses_with_one_line():
    """Started without --nproc (one rank, RANK/WORLD_SIZE unset): the same checks, no process group,
    no C++ frames; a plain python process, not torchrun."""
    import os
    env = dict(os.environ, PRISM_SKIP_CPP="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    p = subprocess.run([sys.executable, "-m", "prism_kernels.cli", "run", "--seq-len", "8", "--cr", "4",
                        "--timeout", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr == ("prism run: rank 0: error: refused before any compute: --timeout must be a finite "
                        "number of seconds > 0, got 0\n"), p.stderr[-2000:]


def test_run_one_rank_compares_with_single_device(tmp_path):
    """One rank (no torchrun): the final line compares with the stock model; voltage is exact."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PRISM_SKIP_CPP="1", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    p = subprocess.run([sys.executable, "-m", "prism_kernels.cli", "run", "--family", "gpt2", "--seq-len", "9",
                        "--mode", "voltage", "--repeat", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [l for l in p.stdout.splitlines() if "max |voltage - single| = " in l]
    assert len(line) == 1, p.stdout
    diff = float(line[0].split("= ")[1].split()[0])
    assert diff < 1e-4 and "single-device latency" in line[0] and "speed-up x" in line[0]
    # --no-compare reaches the ranks that torchrun starts
    from prism_kernels.distributed import launch
    args = cli.build_parser().parse_args(["run", "--nproc", "2", "--seq-len", "9", "-m", "1", "--no-compare"])
    assert "--no-compare" in launch.args_to_argv(args) and "--nproc" not in launch.args_to_argv(args)


def test_demo_unknown_backend_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--backend", "foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: invalid choice: 'foo'" in err and "Traceback" not in err

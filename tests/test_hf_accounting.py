"""Accounting of a real forward (prism_kernels.hf.accounting) against `prism costs`.

* no padding: tokens, bytes and FLOPs per device equal prism_kernels.costs.estimate
  for the same N, P and CR (BERT); GPT-2 devices receive only earlier partitions'
  means (the causal figure of the cost model);
* padding: each sequence is accounted at its own real length;
* recording leaves no attributes behind and needs enable_prism.
"""
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import prism_kernels.hf as phf
from prism_kernels.costs import estimate
from prism_kernels.hf import accounting

BERT = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=64)


def _bert():
    torch.manual_seed(0)
    return BertModel(BERT).eval()


def test_matches_cost_model_without_padding():
    model = phf.enable_prism(_bert(), num_partitions=3, compression_rate=4.0)
    with torch.no_grad(), accounting.record(model) as acct:
        model(input_ids=torch.randint(1, 100, (2, 32)))
    s = acct.summary()
    r = estimate(BERT, seq_len=32, num_partitions=3, compression_rate=4.0)
    assert s["layers"] == 2 and s["sequences"] == 2
    assert len(acct.devices) == 2 * 2 * 3                                  # layers x sequences x devices
    assert [d.received_tokens for d in acct.devices[:3]] == r.prism_tokens_devices
    assert s["prism_tokens_per_device_layer"] == pytest.approx(r.prism_tokens_per_layer)
    assert s["voltage_bytes_per_device_layer"] == pytest.approx(r.voltage_bytes_per_layer)
    assert s["prism_bytes_per_device_layer"] == pytest.approx(r.prism_bytes_per_layer)
    assert s["prism_gflops_per_device"] == pytest.approx(r.prism_gflops_per_device, rel=1e-9)
    assert s["voltage_gflops_per_device"] == pytest.approx(r.voltage_gflops_per_device, rel=1e-9)
    assert s["single_gflops"] == pytest.approx(r.single_gflops, rel=1e-9)
    assert s["prism_gflops_max_device"] == pytest.approx(r.prism_gflops_max, rel=1e-9)
    assert s["prism_total_gflops"] == pytest.approx(2 * r.prism_gflops_total, rel=1e-9)
    assert not any("_prism_plans" in m.__dict__ for m in model.modules())


def test_causal_devices_receive_earlier_means_only():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = phf.enable_prism(GPT2LMHeadModel(cfg).eval(), num_partitions=3, compression_rate=4.0)
    with torch.no_grad(), accounting.record(model) as acct:
        model(input_ids=torch.randint(1, 100, (1, 30)))
    r = estimate(cfg, seq_len=30, num_partitions=3, compression_rate=4.0)
    assert [d.received_tokens for d in acct.devices if d.layer == 0] == r.prism_causal_tokens_devices
    assert r.prism_causal_tokens_devices[0] == 0


def test_padding_accounts_real_lengths():
    model = phf.enable_prism(_bert(), num_partitions=2, num_means=2)
    ids = torch.randint(1, 100, (2, 20))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    with torch.no_grad(), accounting.record(model) as acct:
        model(input_ids=ids, attention_mask=am)
    first = {(d.sequence, d.device): d for d in acct.devices if d.layer == 0}
    assert first[(0, 0)].n_tokens == 20 and first[(1, 0)].n_tokens == 7
    assert [first[(1, i)].own_tokens for i in range(2)] == [4, 3]
    assert [first[(1, i)].voltage_tokens for i in range(2)] == [3, 4]
    assert all(d.received_tokens == 2 for d in first.values())


def test_record_needs_prism():
    with pytest.raises(ValueError, match="enable_prism"):
        with accounting.record(_bert()):
            pass

"""Bad input gets a ValueError naming the argument and the rule (prism_kernels/checks.py)."""
import math

import pytest
import torch

import prism_kernels as pk


def qkv(B=1, H=2, Hkv=2, Nq=4, Nk=4, d=8, dtype=torch.float32):
    return torch.randn(B, H, Nq, d, dtype=dtype), torch.randn(B, Hkv, Nk, d, dtype=dtype), \
        torch.randn(B, Hkv, Nk, d, dtype=dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: pk.partition_sizes(3, 4), "num_partitions must be <= n_tokens"),
    (lambda: pk.partition_sizes(0, 1), "n_tokens must be >= 1"),
    (lambda: pk.partition_sizes(5, 0), "num_partitions must be >= 1"),
    (lambda: pk.partition_sizes(5.5, 2), "n_tokens must be an integer"),
    (lambda: pk.num_means(10, 0.5), "compression_rate must be a finite number >= 1"),
    (lambda: pk.num_means(10, float("nan")), "compression_rate must be a finite number >= 1"),
    (lambda: pk.num_means(10, "2"), "compression_rate must be a real number"),
    (lambda: pk.segment_means(torch.randn(5, 4), 0), "1 <= num_segments <= n"),
    (lambda: pk.segment_means(torch.randn(5, 4), 6), "1 <= num_segments <= n"),
    (lambda: pk.segment_means(torch.randn(5, 4), 2.0), "num_segments must be an integer"),
    (lambda: pk.segment_means(torch.randn(5), 1), "x must have at least 2 dims"),
    (lambda: pk.segment_means(torch.randn(0, 4), 1), "x must not be empty"),
    (lambda: pk.segment_means(torch.randint(0, 3, (5, 4)), 1), "x must be float32"),
    (lambda: pk.segment_means(torch.randn(5, 4), 2, backend="fast"), "backend must be one of"),
])
def test_partition_and_segment_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _attn_case(name):
    q, k, v = qkv()
    if name == "counts_below_1":
        return dict(q=q, k=k, v=v, key_counts=torch.tensor([1, 0, 2, 1])), "key_counts must be >= 1"
    if name == "counts_nan":
        return dict(q=q, k=k, v=v, key_counts=torch.tensor([1, float("nan"), 2, 1])), "key_counts must be finite"
    if name == "counts_shape":
        return dict(q=q, k=k, v=v, key_counts=torch.ones(5)), "key_counts must have shape"
    if name == "counts_bool":
        return dict(q=q, k=k, v=v, key_counts=torch.ones(4, dtype=torch.bool)), "key_counts must be an integer or float"
    if name == "dtype_mismatch":
        return dict(q=q, k=k.half(), v=v), "share one dtype"
    if name == "int_dtype":
        return dict(q=q.long(), k=k.long(), v=v.long()), "q must be float32"
    if name == "rank":
        return dict(q=q[0], k=k, v=v), "q must be 4-D"
    if name == "batch":
        return dict(q=q, k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), "batch size"
    if name == "head_dim":
        return dict(q=q, k=torch.randn(1, 2, 4, 16), v=torch.randn(1, 2, 4, 16)), "head dimension"
    if name == "kv_mismatch":
        return dict(q=q, k=k, v=torch.randn(1, 2, 5, 8)), "k and v must share"
    if name == "gqa":
        q3, k3, v3 = qkv(H=3, Hkv=2)
        return dict(q=q3, k=k3, v=v3), "multiple of the key/value heads"
    if name == "causal_no_pos":
        q5, k5, v5 = qkv(Nq=3, Nk=5)
        return dict(q=q5, k=k5, v=v5, causal=True), "needs both q_pos and k_pos"
    if name == "pos_without_causal":
        return dict(q=q, k=k, v=v, q_pos=torch.arange(4)), "only used with causal=True"
    if name == "pos_float":
        return dict(q=q, k=k, v=v, causal=True, q_pos=torch.arange(4.0), k_pos=torch.arange(4)), "q_pos must be an integer"
    if name == "pos_shape":
        return dict(q=q, k=k, v=v, causal=True, q_pos=torch.arange(3), k_pos=torch.arange(4)), "q_pos must have shape"
    if name == "empty":
        q0, k0, v0 = qkv(Nq=0)
        return dict(q=q0, k=k0, v=v0), "q must not be empty"
    if name == "scale":
        return dict(q=q, k=k, v=v, scale=math.inf), "scale must be a finite"
    if name == "backend":
        return dict(q=q, k=k, v=v, backend="cuda"), "backend must be one of"
    if name == "device":
        return dict(q=q, k=k.to("meta"), v=v), "on one device"
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "counts_below_1", "counts_nan", "counts_shape", "counts_bool", "dtype_mismatch", "int_dtype",
    "rank", "batch", "head_dim", "kv_mismatch", "gqa", "causal_no_pos", "pos_without_causal",
    "pos_float", "pos_shape", "empty", "scale", "backend", "device"])
def test_attention_errors(name):
    kwargs, match = _attn_case(name)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=match):
        pk.prism_attention(q, k, v, **kwargs)


def test_layout_errors():
    with pytest.raises(ValueError, match="num_partitions must be <= n_tokens"):
        pk.plan_layout(3, 4, num_means=1)
    with pytest.raises(ValueError, match="compression_rate must be a finite number >= 1"):
        pk.plan_layout(30, 2, compression_rate=0.9)

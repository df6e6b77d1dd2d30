"""benchmarks/accuracy/oracle_bounds.py (the bounds of one row per segment in
docs/accuracy.md): its own default row must be the package's, its "both exact" summary
the full attention, and every summary exact at the query the rows are matched at.
The oracle is plain softmax over every token (fp64)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from prism_kernels.config import PrismConfig
from prism_kernels.hf.attention import simulate_prism

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "oracle_bounds.py"
_spec = importlib.util.spec_from_file_location("oracle_bounds", _PATH)
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)


def _inputs(seed, B=2, H=4, N=36, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) + 0.5
    k, v = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _cfg(P):
    return PrismConfig(P, compression_rate=4, anchors="special+topk", anchor_topk=1, count_bias="matched_cls")


@pytest.mark.parametrize("P", [2, 3])
def test_rows_are_the_packages_and_both_exact_is_full_attention(P):
    q, k, v = _inputs(7)
    cfg = _cfg(P)
    pkg = simulate_prism(q, k, v, config=cfg, causal=False)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    rows = ob.oracle_simulate("rows")(q, k, v, config=cfg, causal=False)
    both = ob.oracle_simulate("both")(q, k, v, config=cfg, causal=False)
    assert torch.allclose(rows, pkg, atol=1e-10, rtol=0)
    assert torch.allclose(both, full, atol=1e-10, rtol=0)
    assert (pkg - full).abs().max() > 1e-3           # the rows are summaries: not exact


@pytest.mark.parametrize("mode", ob.MODES)
def test_every_summary_is_exact_at_the_matched_query(mode):
    """A token of the last partition whose query equals the first token's (the [CLS]
    query the rows are matched at) gets the full attention under every summary; its
    neighbour does not, except under "both"."""
    q, k, v = _inputs(8)
    t = q.shape[2] - 3
    q[:, :, t] = q[:, :, 0]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    out = ob.oracle_simulate(mode)(q, k, v, config=_cfg(2), causal=False)
    assert torch.allclose(out[:, t], full[:, t], atol=1e-10, rtol=0)
    assert torch.isfinite(out).all()
    if mode != "both":
        assert (out[:, t - 1] - full[:, t - 1]).abs().max() > 1e-4


def test_the_rows_score_is_a_lower_bound_of_the_mass():
    """The row's score is the first-order expansion of the convex log-sum-exp at the
    matched query, so it never exceeds the exact mass, and equals it there."""
    gen = torch.Generator().manual_seed(9)
    Bg, H, n, m, d, s = 2, 3, 12, 4, 8, 0.35
    kp, vp = (torch.randn(Bg, H, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    seg_of = torch.stack([torch.randperm(n, generator=gen) % m for _ in range(Bg)])
    q0 = torch.randn(Bg, H, 1, d, generator=gen, dtype=torch.float64)
    q = torch.cat([q0, torch.randn(Bg, H, 5, d, generator=gen, dtype=torch.float64) * 2], dim=2)
    onehot = torch.nn.functional.one_hot(seg_of, m).to(torch.float64)             # [Bg, n, m]
    w = torch.softmax((s * q0 @ kp.transpose(-1, -2)).transpose(-1, -2)
                      + torch.where(onehot > 0, 0.0, float("-inf"))[:, None], dim=-2)   # [Bg, H, n, m]
    km = torch.einsum("bhnm,bhnd->bhmd", w, kp)
    vm = torch.einsum("bhnm,bhnd->bhmd", w, vp)
    L0 = torch.logsumexp((s * q0 @ kp.transpose(-1, -2)).unsqueeze(-1)
                         + torch.where(onehot > 0, 0.0, float("-inf"))[:, None, None], dim=-2)   # [Bg, H, 1, m]
    b = L0[:, :, 0] - s * (q0 @ km.transpose(-1, -2))[:, :, 0]                    # [Bg, H, m]
    row, _ = ob._segment_terms(q, kp, vp, seg_of, m, s, km, vm, b, "rows")
    mass, _ = ob._segment_terms(q, kp, vp, seg_of, m, s, km, vm, b, "mass")
    assert torch.allclose(row[:, :, 0], mass[:, :, 0], atol=1e-12, rtol=0)
    assert (row <= mass + 1e-12).all()
    assert (mass - row)[:, :, 1:].max() > 1e-2

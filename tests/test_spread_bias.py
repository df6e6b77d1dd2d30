"""count_bias="spread" (an experiment of the simulation): the log-count bias plus
s^2 |q|^2 sigma^2 / 2 per segment, checked against a dense computation written here."""
import math

import pytest
import torch

from prism_kernels.config import PrismConfig
from prism_kernels.hf.attention import simulate_prism


def _dense(q, k, v, sizes, m, scale):
    """Device by device, plain loops: own keys (bias 0) and the other partition's
    segment means with bias log c + scale^2 |q|^2 var / 2 (var: per head, mean over dims)."""
    B, H, N, d = q.shape
    out = torch.zeros(B, N, H, d, dtype=torch.float64)
    offs = [0, sizes[0]]
    for i in range(2):
        j = 1 - i
        o, n = offs[i], sizes[i]
        oj, nj = offs[j], sizes[j]
        base, rem = divmod(nj, m)
        segs, t = [], oj
        for s_ in range(m):
            c = base + (1 if s_ < rem else 0)
            segs.append(list(range(t, t + c)))
            t += c
        for b in range(B):
            for h in range(H):
                keys = [k[b, h, t] for t in range(o, o + n)]
                vals = [v[b, h, t] for t in range(o, o + n)]
                extra = [(0.0, 0.0)] * n
                for seg in segs:
                    ks = torch.stack([k[b, h, t] for t in seg]).double()
                    keys.append(ks.mean(0))
                    vals.append(torch.stack([v[b, h, t] for t in seg]).double().mean(0))
                    var = ((ks - ks.mean(0)) ** 2).mean().item()
                    extra.append((math.log(len(seg)), var))
                K, V = torch.stack(keys).double(), torch.stack(vals).double()
                for t in range(o, o + n):
                    qq = q[b, h, t].double()
                    sc = scale * (K @ qq)
                    sc = sc + torch.tensor([lc + 0.5 * scale ** 2 * (qq @ qq).item() * var for lc, var in extra],
                                           dtype=torch.float64)
                    out[b, t, h] = torch.softmax(sc, 0) @ V
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_spread_bias_matches_dense(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, N, d = 2, 2, 13, 4
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    cfg = PrismConfig(2, num_means=3, anchors="none", segments="runs", count_bias="spread")
    out = simulate_prism(q, k, v, config=cfg, causal=False, scale=0.5)
    ref = _dense(q, k, v, [7, 6], 3, 0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    plain = simulate_prism(q, k, v, config=PrismConfig(2, num_means=3, anchors="none", segments="runs"),
                           causal=False, scale=0.5)
    assert (plain.double() - ref).abs().max() > 1e-3      # the correction really changes the result


def test_spread_bias_is_exact_at_cr1_and_refused_by_the_runtime():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    out = simulate_prism(q, k, v, config=PrismConfig(3, compression_rate=1.0, count_bias="spread"), causal=False,
                         scale=0.5)
    torch.testing.assert_close(out, exact.transpose(1, 2), atol=1e-5, rtol=1e-5)
    from prism_kernels.distributed.runtime import RunConfig
    with pytest.raises(ValueError, match="count_bias"):
        RunConfig(mode="prism", prism=PrismConfig(2, compression_rate=4, count_bias="spread"))
    with pytest.raises(ValueError, match="count_bias"):
        PrismConfig(2, compression_rate=4, count_bias="sqrt")

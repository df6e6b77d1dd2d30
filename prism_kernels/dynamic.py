"""Data-dependent segments: each device picks its partition's segments from the
layer's keys, in the simulation (prism_kernels.hf) and the runtime alike.

PrismConfig.anchors="special+topk" and PrismConfig.segments="content" /
"content_sse" / "kmeans" (prism_kernels/anchors.py). The static plan
(PrismConfig.plan(..., static=True)) still fixes what does not depend on the
data: the partitions, the rows m_j each partition sends and which special tokens
stay alone. In every layer and for every sequence the sending device then
chooses, from its own keys only:

  * "special+topk": besides the special anchors, the `anchor_topk` tokens with the
    largest score go alone (count 1), out of the same m_j rows; score "key_norm"
    is ||k_t|| (all heads), "key_dev" is ||k_t - mean of the partition's keys||.
    At least one row stays for the mean of the other tokens;
  * "content": the tokens that are not anchors are split into m_rest runs (in
    token order) whose m_rest - 1 boundaries sit where consecutive keys differ most
    (largest ||k_t - k_prev||); "content_sse": the m_rest runs with the least total
    within-run squared deviation of the keys (exact dynamic programming);
    "kmeans": m_rest groups of similar keys, not necessarily contiguous (Lloyd's
    k-means started from the equal runs); otherwise equal runs (Alg. 2).

What crosses the network besides the means: each segment's count (m_j int32 per
layer and sequence), since counts change from layer to layer (the runtime packs
them in front of the rows, costs.comm.COUNT_BYTES). Positions are not needed for
the causal mask: a causal device only receives earlier partitions, whose every
token precedes all of its queries (the decoder's mask never hides a received
row), so the static plan's positions stay valid.

`partition_segments(config, k, part, fixed, grid)` gives every token of a
partition its segment ([Bg, n] indices in 0..m-1) and the counts [Bg, m] under a
config's policy (`assign` with the policy's arguments); `fixed_anchors` says
which of a partition's tokens the static plan keeps alone; `means` averages by
an assignment; `segments_of(...)` turns one sequence's assignment into token
tuples (for tests).
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch

from .anchors import resolve_topk
from .plan import Partition, _blocks, split_sizes


def sse_boundaries(x: torch.Tensor, m: int) -> torch.Tensor:
    """Optimal split of each row's R tokens (x [Bg, R, F], in order) into m runs, the one
    with the least total within-run squared deviation (sum over runs of
    sum ||x_t - run mean||^2; dynamic programming over the prefix sums, O(m R^2)).
    Returns starts [Bg, R] int64: 1 where a run other than the first begins."""
    Bg, R, F = x.shape
    dev = x.device
    xd = x.double()
    S1 = torch.cat([xd.new_zeros(Bg, 1, F), xd.cumsum(1)], 1)               # [Bg, R+1, F]
    S2 = torch.cat([xd.new_zeros(Bg, 1), (xd * xd).sum(-1).cumsum(1)], 1)   # [Bg, R+1]
    idx = torch.arange(R + 1, device=dev, dtype=torch.float64)
    length = idx[None, :] - idx[:, None]                                    # [i, j] = j - i
    G = S1 @ S1.transpose(1, 2)                                             # S1_i . S1_j
    n2 = torch.diagonal(G, dim1=1, dim2=2)
    sq = n2[:, :, None] + n2[:, None, :] - 2 * G                            # ||S1_j - S1_i||^2
    cost = S2[:, None, :] - S2[:, :, None] - sq / length.clamp(min=1)       # run i..j-1
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    cost = torch.where((length >= 1)[None], cost, inf)
    D = cost[:, 0, :].clone()                                               # one run: 0..j-1
    back = []
    for _ in range(m - 1):
        tot = D[:, :, None] + cost                                          # [Bg, i, j]
        D, arg = tot.min(dim=1)
        back.append(arg)
    starts = torch.zeros(Bg, R, dtype=torch.int64, device=dev)
    j = torch.full((Bg,), R, dtype=torch.int64, device=dev)
    for arg in reversed(back):
        i = arg.gather(1, j[:, None]).squeeze(1)                             # last run starts at i
        starts.scatter_(1, i[:, None], 1)
        j = i
    return starts


def kmeans_groups(x: torch.Tensor, m: int, iters: int = 10) -> torch.Tensor:
    """Groups of each row's R tokens (x [Bg, R, F]) by Lloyd's k-means with m clusters,
    started from the m equal runs (so the total within-group squared deviation is at
    most the runs'). A row whose update would leave a group empty keeps its previous
    groups. Returns the group of every token, [Bg, R] int64 in 0..m-1 (not contiguous)."""
    Bg, R, F = x.shape
    dev = x.device
    xd = x.double()
    g = torch.repeat_interleave(torch.arange(m, device=dev), torch.tensor(split_sizes(R, m), device=dev),
                                output_size=R).expand(Bg, R).clone()
    rows = torch.arange(Bg, device=dev)[:, None] * m
    for _ in range(iters):
        cnt = torch.zeros(Bg, m, dtype=torch.float64, device=dev).scatter_add_(1, g, torch.ones_like(xd[..., 0]))
        cen = xd.new_zeros(Bg * m, F).index_add(0, (g + rows).reshape(-1), xd.reshape(-1, F)).view(Bg, m, F)
        cen = cen / cnt[..., None]
        new = torch.cdist(xd, cen).argmin(-1)
        full = torch.zeros(Bg, m, dtype=torch.int64, device=dev).scatter_add_(1, new, torch.ones_like(new))
        new = torch.where((full > 0).all(1, keepdim=True), new, g)
        if torch.equal(new, g):
            break
        g = new
    return g


@functools.lru_cache(maxsize=8192)
def _block_table(toks: Tuple[int, ...], m: int, grid: Tuple[int, int, int]) -> Tuple[int, ...]:
    """The 2-D block (plan._blocks, m blocks) of each of the ascending tokens `toks`.
    Cached: a partition's averaged patches differ from layer to layer only by the few
    tokens sent alone, so the same sets recur (the bisection is Python: ~1 ms a call)."""
    pos = {t: r for r, t in enumerate(toks)}
    out = [0] * len(toks)
    for s_, blk in enumerate(_blocks(toks, m, grid)):
        for t in blk:
            out[pos[t]] = s_
    return tuple(out)


def assign(k: torch.Tensor, m: int, fixed: Sequence[int] = (), topk: int = 0, score: str = "key_norm",
           content=False, grid=None, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Segments of one partition for a batch of sequences.

    k [Bg, n, F]: the partition's keys (local order); m: rows it sends (1 <= m <= n);
    fixed: local indices of tokens always alone (the special anchors the plan keeps,
    len(fixed) < m unless m == 1). Returns (seg_of [Bg, n] int64 in 0..m-1,
    counts [Bg, m] int64): segments 0..m_rest-1 are the runs in token order, then
    the anchors in token order. content: False (equal runs), True (boundaries at
    the largest jumps between consecutive keys) or "sse" (the runs with the least
    within-run squared deviation of the keys, sse_boundaries) or "kmeans" (groups of
    similar keys, not contiguous: kmeans_groups). grid (rows, cols, first)
    with the partition's `offset` in the sequence: when every averaged token is an
    image patch, they form compact 2-D blocks of the patch grid as in the static plan
    (plan._blocks on each sequence's own set of tokens) instead of runs."""
    Bg, n, _ = k.shape
    dev = k.device
    fixed = sorted(set(int(f) for f in fixed))
    if m == 1:
        fixed = []
    if not 1 <= m <= n or (fixed and len(fixed) >= m):
        raise ValueError(f"need 1 <= m <= n and fewer fixed anchors than m, got m={m}, n={n}, fixed={fixed}")
    free = m - len(fixed)
    top = max(0, min(int(topk), free - 1))
    m_rest = free - top
    kf = k.detach().float()        # the choice is not differentiated
    top_idx = None
    if top:
        if score == "key_norm":
            s = kf.norm(dim=-1)
        elif score == "key_dev":
            s = (kf - kf.mean(dim=1, keepdim=True)).norm(dim=-1)
        else:
            raise ValueError(f"unknown anchor score {score!r}")
        if fixed:
            s[:, fixed] = float("-inf")
        top_idx = s.topk(top, dim=1).indices                            # [Bg, top]
    if (not content or m_rest == 1) and not torch.compiler.is_compiling():
        # the segments depend only on which tokens go alone: one cached layout per set,
        # a few torch ops a layer instead of building it each time (eager only: the
        # layouts are read by value, which torch.compile would have to guard on)
        grid = tuple(grid) if grid is not None else None
        alone = [tuple(fixed)] * Bg if top_idx is None else \
            [tuple(sorted(fixed + row)) for row in top_idx.tolist()]
        layouts = [_layout(n, m, tuple(fixed), a, grid, offset) for a in alone]
        return (torch.stack([lay[0] for lay in layouts]).to(dev),
                torch.stack([lay[1] for lay in layouts]).to(dev))
    anchor = torch.zeros(Bg, n, dtype=torch.bool, device=dev)
    if fixed:
        anchor[:, fixed] = True
    if top_idx is not None:
        anchor.scatter_(1, top_idx, True)
    R = n - len(fixed) - top                       # tokens averaged, R >= m_rest
    # rest tokens in token order: a stable sort puts the non-anchors first
    order = torch.sort(anchor.to(torch.int8), dim=1, stable=True).indices
    rest = order[:, :R]
    if m_rest > 1 and not content and _averages_patches(n, tuple(fixed), grid, offset):
        grid = tuple(grid)
        seg_rest = torch.tensor([_block_table(tuple(offset + t for t in row), m_rest, grid)   # ascending
                                 for row in rest.cpu().tolist()], dtype=torch.int64, device=dev)
    elif content and m_rest > 1:
        kr = kf.gather(1, rest[..., None].expand(Bg, R, kf.shape[-1]))
        if content == "kmeans":
            seg_rest = kmeans_groups(kr, m_rest)
            starts = None
        elif content == "sse":
            starts = sse_boundaries(kr, m_rest)
        else:
            jump = (kr[:, 1:] - kr[:, :-1]).norm(dim=-1)              # [Bg, R-1]: before rest token r+1
            starts = torch.zeros(Bg, R, dtype=torch.int64, device=dev)
            starts[:, 1:].scatter_(1, jump.topk(m_rest - 1, dim=1).indices, 1)
        if starts is not None:
            seg_rest = starts.cumsum(1)
    else:
        # (output_size: a size known when traced, so torch.compile(fullgraph=True) needs no guard)
        table = torch.repeat_interleave(torch.arange(m_rest, device=dev),
                                        torch.tensor(split_sizes(R, m_rest), device=dev), output_size=R)
        seg_rest = table.expand(Bg, R)
    seg_of = torch.empty(Bg, n, dtype=torch.int64, device=dev)
    seg_of.scatter_(1, rest, seg_rest)
    if n > R:
        anc = order[:, R:]                                              # anchors in token order
        seg_of.scatter_(1, anc, (m_rest + torch.arange(n - R, device=dev)).expand(Bg, n - R))
    counts = torch.zeros(Bg, m, dtype=torch.int64, device=dev).scatter_add_(
        1, seg_of, torch.ones_like(seg_of))
    return seg_of, counts


def _averages_patches(n: int, fixed: Tuple[int, ...], grid, offset: int) -> bool:
    """Whether every token of the partition (n tokens from `offset`) but the static anchors
    `fixed` is an image patch of `grid` (rows, cols, first): then segments are 2-D blocks."""
    return grid is not None and all(grid[2] <= offset + t < grid[2] + grid[0] * grid[1]
                                    for t in range(n) if t not in fixed)


@functools.lru_cache(maxsize=8192)
def _layout(n: int, m: int, fixed: Tuple[int, ...], alone: Tuple[int, ...], grid,
            offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(seg_of [n], counts [m]) of a partition of n tokens sending m rows when the local
    tokens `alone` (ascending; the static anchors `fixed` and the chosen ones) go alone and
    the rest is split without looking at the keys: compact 2-D blocks when every token but
    the static anchors is an image patch of `grid` (rows, cols, first; the partition starts
    at `offset`), else equal runs in token order. Segments
    0..m_rest-1 are the blocks / runs, then the lone tokens in token order. Cached: the
    same sets recur from layer to layer (the bisection is Python, ~1 ms a call)."""
    is_alone = set(alone)
    rest = [t for t in range(n) if t not in is_alone]
    m_rest = m - len(alone)
    if m_rest > 1 and _averages_patches(n, fixed, grid, offset):
        seg_rest = _block_table(tuple(offset + t for t in rest), m_rest, grid)
    else:
        seg_rest = [s_ for s_, c in enumerate(split_sizes(len(rest), m_rest)) for _ in range(c)]
    seg_of = [0] * n
    for t, s_ in zip(rest, seg_rest):
        seg_of[t] = s_
    for i, t in enumerate(alone):
        seg_of[t] = m_rest + i
    seg = torch.tensor(seg_of, dtype=torch.int64)
    return seg, torch.bincount(seg, minlength=m)


def means(x: torch.Tensor, seg_of: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [Bg, n, F], seg_of [Bg, n] -> segment means [Bg, m, F] (fp32 accumulation)."""
    Bg, n, F = x.shape
    m = counts.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = (seg_of + torch.arange(Bg, device=x.device)[:, None] * m).reshape(-1)
    sums = x.new_zeros(Bg * m, F, dtype=acc).index_add(0, flat, x.reshape(-1, F).to(acc))
    return (sums.view(Bg, m, F) / counts.to(acc)[..., None]).to(x.dtype)


def segments_of(seg_of_row: torch.Tensor, offset: int) -> List[Tuple[int, ...]]:
    """One sequence's assignment [n] -> its segments as ascending global token tuples."""
    m = int(seg_of_row.max()) + 1
    return [tuple(offset + int(t) for t in (seg_of_row == s).nonzero().flatten()) for s in range(m)]


# PrismConfig.segments -> assign's `content` argument
CONTENT = {"content": True, "content_sse": "sse", "kmeans": "kmeans"}


def fixed_anchors(part: Partition, anchors: Sequence[int]) -> Tuple[int, ...]:
    """Local indices of the policy's static anchors (`anchors`: global token indices,
    anchors.resolve) that the plan keeps alone in partition `part`."""
    keep = set(anchors)
    return tuple(s.tokens[0] - part.offset for s in part.segments if s.count == 1 and s.tokens[0] in keep)


def partition_segments(config, k: torch.Tensor, part: Partition, fixed: Sequence[int],
                       grid=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`assign` under a PrismConfig's data-dependent policy: k [Bg, n_j, F] the
    partition's keys (rotated for rotary models), part its static plan (rows m_j)."""
    topk = resolve_topk(config.anchor_topk, grid) if config.anchors == "special+topk" else 0
    score = config.anchor_score
    if score == "auto":       # measured best: the key norm on images, the key deviation on text
        score = "key_norm" if grid is not None else "key_dev"
    content = _content_mode(config, grid)
    return assign(k, part.num_segments, fixed, topk, score, content, grid=grid, offset=part.offset)


def _content_mode(config, grid):
    """assign's `content` argument for a config. segments "auto" on text (no grid): runs
    cut at the largest jumps between consecutive keys, O(R F); content_sse (optimal runs)
    measured a little better but costs O(m R^2) per layer (docs/accuracy.md)."""
    content = CONTENT.get(config.segments, False)
    if config.segments == "auto" and grid is None:
        content = True
    return content


def chooses(config, part: Partition, fixed: Sequence[int], grid=None) -> bool:
    """Whether a partition's segments depend on its keys under the config's policy. Not
    when its rows leave no choice: no top-k anchor fits (one row stays for the mean of
    the rest) and the rest is one mean, or equal 2-D blocks / runs that do not depend on
    the data, or every token is sent alone (CR = 1). Its segments are then the static plan's, and its counts need not travel
    (the receiver knows them from the plan): the runtime sends it like a static plan."""
    if not config.dynamic:
        return False
    m = part.num_segments
    if m == 1 or m >= part.size:         # one mean, or every token alone (counts all 1)
        return False
    free = m - len(fixed)
    top = max(0, min(resolve_topk(config.anchor_topk, grid), free - 1)) if config.anchors == "special+topk" else 0
    return top > 0 or (free - top > 1 and bool(_content_mode(config, grid)))


def counted_rows(config, plan, anchors: Sequence[int], grid=None) -> List[int]:
    """Per device: the received rows whose counts travel with them (the rows of source
    partitions that `chooses`), for the cost model (costs.comm.COUNT_BYTES each)."""
    send = [chooses(config, p, fixed_anchors(p, anchors), grid) for p in plan.partitions]
    return [sum(plan.partitions[j].num_segments for j in d.sources if send[j]) for d in plan.devices]

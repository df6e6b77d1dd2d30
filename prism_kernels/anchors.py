"""Which tokens a device sends alone, and how it groups image patches.

Plain segment means (the paper's method) average every token of a segment. Two
things a model's input has make that lossy (docs/accuracy.md, "Anchors and 2-D
segments"):

  * attention sinks: [CLS] in BERT and ViT / DINOv2, token 0 in decoders. Many
    queries put a large share of their attention on them; averaged into their
    neighbours, that share is lost. Sent alone (an *anchor*: a segment of one
    token, count 1) they keep it;
  * image patches in row-major order: contiguous runs wrap across rows of the
    patch grid. Compact 2-D blocks of the grid average patches that are close in
    the image.

`TokenRoles` says where a model's special tokens and patch grid are (the model
table gives one per model type, prism_kernels.models); `PrismConfig.anchors` and
`PrismConfig.segments` choose the policy; `resolve(...)` turns both into the
`anchors` and `grid` arguments of plan.make_plan for a sequence of n tokens.

Policies (PrismConfig.anchors):
  * "auto" (default): the best measured policy (docs/accuracy.md): "special+topk"
    with the key-deviation score, where the means are taken of the attention input
    with the log-count bias (the defaults); "special" otherwise (block_input
    averaging takes its means before the keys exist). `resolve_anchors` decides;
  * "special": the model's special tokens: the leading ones ([CLS], BOS or a
    decoder's first token, register tokens) and the trailing ones ([SEP], </s>);
  * "first": the first token only;
  * "none": no anchors, the paper's plain means;
  * "special+topk" (data-dependent, prism_kernels/dynamic.py): the special tokens
    and, chosen by each device on its own in every layer, the `anchor_topk` tokens
    ("auto" (default): IMAGE_TOPK on a patch grid, TEXT_TOPK for text)
    of its partition with the largest local score (`anchor_score`: "key_norm", the
    norm of the token's key; "key_dev", the distance of its key from the partition's
    mean key; "auto" (default), the better measured of the two: key_norm where the
    tokens form 2-D blocks of a patch grid (images), key_dev otherwise (text)), out
    of the same rows.
Segment shapes (PrismConfig.segments):
  * "auto" (default): compact 2-D blocks of the patch grid for vision models; for
    text, contiguous runs, cut where consecutive keys differ most (as "content")
    when the segments are chosen per layer anyway (data-dependent anchors), else
    equal runs;
  * "runs": equal contiguous runs everywhere (the paper's Alg. 2);
  * "content" (data-dependent): runs of the non-anchor tokens whose m - 1
    boundaries are where consecutive keys differ most (||k_t - k_t-1||), chosen by
    each device in every layer;
  * "content_sse" (likewise): the runs with the least total within-run squared
    deviation of the keys (exact dynamic programming, prism_kernels/dynamic.py);
  * "kmeans" (likewise): groups of similar keys, not contiguous (k-means on each
    partition's keys, started from the runs).
  For the data-dependent policies the static plan (`resolve`) fixes the rows m_j
  each partition sends and the special anchors; the rest is chosen per layer.
Budget (PrismConfig.anchor_budget):
  * "shared" (default): anchors come out of the partition's m_j rows, so the
    compression rate stays what it says: a partition sends exactly m_j rows (with
    k >= m_j anchors only the first m_j - 1 stay alone; at m_j = 1, one plain mean);
  * "extra": anchors are sent on top of m_j means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

ANCHORS = ("auto", "special", "first", "none", "special+topk")
SEGMENTS = ("auto", "runs", "content", "content_sse", "kmeans")
ANCHOR_SCORES = ("auto", "key_norm", "key_dev")
# data-dependent policies (prism_kernels/dynamic.py): counts travel with the means
DYNAMIC_ANCHORS = ("special+topk",)
DYNAMIC_SEGMENTS = ("content", "content_sse", "kmeans")
ANCHOR_BUDGETS = ("shared", "extra")
DEFAULT_ANCHORS = "auto"
DEFAULT_ANCHOR_SCORE = "auto"
# anchor_topk "auto": top-k tokens sent alone per partition, by the measured best
# (docs/accuracy.md): one on a patch grid (a second costs digits 6-9 points); six on
# text (SmolLM2 bits per character and MiniLM cosines improve up to six, eight is no better)
DEFAULT_ANCHOR_TOPK = "auto"
IMAGE_TOPK = 1
TEXT_TOPK = 6


def check_anchor_topk(k, name: str = "anchor_topk"):
    """k if it is "auto" or an integer >= 0, else ValueError naming `name`."""
    import numbers
    if k == "auto":
        return k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"{name} must be 'auto' or an integer >= 0, got {k!r}")
    return int(k)


def resolve_topk(k, grid) -> int:
    """anchor_topk as a number: "auto" -> IMAGE_TOPK with a patch grid, else TEXT_TOPK."""
    if k == "auto":
        return IMAGE_TOPK if grid is not None else TEXT_TOPK
    return int(k)
DEFAULT_SEGMENTS = "auto"
DEFAULT_ANCHOR_BUDGET = "shared"
# count_bias "auto": rows matched at the mean query for text encoders (hf/matched_summary.py;
# MiniLM's embeddings move about halfway to exact), at the [CLS] query for vision encoders
# (DINOv2: 2-3 points on Fashion-MNIST, 3-5 on digits at 112 px, over the log-count bias;
# at the mean query digits lose 5-7), the log-count bias for decoders (the decode cache
# keeps counts, and SmolLM2 gains only 0.0025 bits per character); docs/accuracy.md
DEFAULT_COUNT_BIAS = "auto"


def resolve_count_bias(count_bias: str, dynamic: bool, causal: bool, vision: bool, every_token: bool = False) -> str:
    """The bias applied: "auto" -> for a bidirectional model whose segments are chosen per
    layer (matched rows need those), "matched_cls" with a patch grid (`vision`) and
    "matched" for text; else "log" (decoders, static plans, and CR = 1, `every_token`,
    where every row is one token and matched rows would only double the bytes); anything
    else as given."""
    if count_bias != "auto":
        return count_bias
    if not dynamic or causal or every_token:
        return "log"
    return "matched_cls" if vision else "matched"


@dataclass(frozen=True)
class TokenRoles:
    """Where a model's special tokens and image patches sit in its input sequence.

    leading: special tokens at the start ([CLS] and register tokens; a decoder's
        first token, which acts as an attention sink whether it is BOS or not);
    trailing: special tokens at the end ([SEP] of BERT, </s> of RoBERTa);
    patch_grid: (rows, cols) of the patch grid at the model's configured image
        size (vision models; None for text). The patches follow the leading tokens.
    """
    leading: int = 1
    trailing: int = 0
    patch_grid: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        for name in ("leading", "trailing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TokenRoles.{name} must be an integer >= 0, got {v!r}")

    def special(self, n: int) -> Tuple[int, ...]:
        """Indices of the special tokens of a sequence of n tokens."""
        lead = range(min(self.leading, n))
        trail = range(max(len(lead), n - self.trailing), n)
        return tuple(lead) + tuple(trail)

    def grid(self, n: int) -> Optional[Tuple[int, int, int]]:
        """(rows, cols, first patch) for a sequence of n tokens, or None when the
        patches do not form a known grid. The configured grid when n matches it;
        else a square grid when the patch count is a square (a vision model run at
        another resolution, e.g. DINOv2's interpolated position embeddings)."""
        if self.patch_grid is None:
            return None
        patches = n - self.leading
        rows, cols = self.patch_grid
        if rows * cols == patches:
            return rows, cols, self.leading
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            return side, side, self.leading
        return None


TEXT = TokenRoles()


def check_policy(anchors: str, segments: str, anchor_budget: str) -> None:
    for name, value, choices in (("anchors", anchors, ANCHORS), ("segments", segments, SEGMENTS),
                                 ("anchor_budget", anchor_budget, ANCHOR_BUDGETS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def resolve_anchors(anchors: str, averaging: str = "attention_input", count_bias: str = "log") -> str:
    """The policy "auto" stands for: "special+topk" where the segments can be chosen
    from the layer's keys (means of the attention input, any bias but "spread"), else
    "special". Other policies are returned as given."""
    if anchors != "auto":
        return anchors
    return "special+topk" if averaging == "attention_input" and count_bias != "spread" else "special"


def is_dynamic(anchors: str, segments: str) -> bool:
    """True when the segments depend on the layer's keys (anchors resolved)."""
    return anchors in DYNAMIC_ANCHORS or segments in DYNAMIC_SEGMENTS


def resolve(n: int, roles: Optional[TokenRoles], anchors: str = DEFAULT_ANCHORS,
            segments: str = DEFAULT_SEGMENTS) -> Tuple[Tuple[int, ...], Optional[Tuple[int, int, int]]]:
    """(anchor token indices, grid or None) of a sequence of n tokens under a policy.
    roles=None: a text model whose first token is its only special token.
    The data-dependent policies give their static part: "special+topk" the special
    tokens, "content" runs (prism_kernels/dynamic.py chooses the rest in every layer)."""
    roles = roles or TEXT
    if anchors == "auto":
        raise ValueError("anchors='auto' must be resolved first (resolve_anchors)")
    if anchors == "none":
        idx: Tuple[int, ...] = ()
    elif anchors == "first":
        idx = (0,)
    else:
        idx = roles.special(n)
    grid = roles.grid(n) if segments == "auto" else None
    return idx, grid

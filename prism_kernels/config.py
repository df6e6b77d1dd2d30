"""PrismConfig: the settings every part of the package reads (simulation, runtime, costs).

* num_partitions (P), or partition_weights (one relative speed per device: sizes
  in proportion, see plan.proportional_sizes);
* exactly one of num_means (m, segments per partition, at most the partition's
  tokens) or compression_rate (CR >= 1, m_j = min(n_j, max(1, ceil(n_j / CR))), Eq. 16);
* averaging, what the segment means are taken of (docs/method.md, "What is averaged"):
    - "attention_input" (default): the input of the keys and values, i.e. the
      normalised attention input; for rotary models the rotated keys and values.
      Measured on SmolLM2-135M at P = 2, CR 10: 1.328 bits per character, against
      2.128 with "block_input";
    - "block_input": the paper's choice, the block input (the residual stream),
      normalised by the receiving block's own pre-attention norm;
* anchors, segments, anchor_budget: which tokens are sent alone and how the others
  are grouped (prism_kernels/anchors.py). Defaults ("auto", "auto", "shared"): the
  model's special tokens and, chosen per layer by each device, the token whose key
  its partition's mean represents worst, alone; the other tokens in 2-D blocks of
  the patch grid for vision models, in runs cut where the keys change for text; out
  of the same budget. With block_input averaging or the spread bias "auto" anchors
  are the special tokens only. anchors="none", segments="runs" is the paper's
  plain means. The config holds the resolved policy (anchors is never "auto");
* count_bias: "auto" (default: with data-dependent segments "matched" for text
  encoders and "matched_cls" for vision encoders, else "log", as for decoders;
  `bias_for`), "log" (the paper's log-count bias); "matched" / "matched_half" /
  "matched_shared" (attention-weighted rows and their bias matched at the sending
  partition's mean query, scaled by 1 / 0.5, or with one weight per token for all
  heads), "matched_cls" (matched at the query of the first token, [CLS]);
  hf/matched_summary.py; the simulation and `prism run`, not generation's prism
  decode; or "spread", an experiment of the
  simulation (the bias corrected for the spread of a segment's keys, hf/spread_bias.py);
* wire_dtype: element type of what crosses the network (fp32 | fp16 | bf16). The
  runtime casts every per-layer payload to it (`prism run --wire-dtype`); the
  simulation rounds every sent row (means and anchors, as K/V) to it and back, so
  `prism eval` measures what the rounding does to accuracy;
* anchor_topk, anchor_score: for anchors="special+topk" (data-dependent segments,
  prism_kernels/dynamic.py), how many tokens each device sends alone besides the
  special ones ("auto": 1 on a patch grid, 6 for text | an integer) and by which
  local score ("auto": key_norm on a patch grid, key_dev for text | "key_norm" |
  "key_dev");
* backend: the kernels' backend (auto | cpp | triton | torch).

`plan(n_tokens, causal, roles=...)` is the one way to get a PrismPlan from these
settings; `roles` (anchors.TokenRoles, from the model table) says where the
model's special tokens and patch grid are.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

from .anchors import (ANCHOR_SCORES, DEFAULT_ANCHOR_BUDGET, DEFAULT_ANCHOR_SCORE, DEFAULT_ANCHOR_TOPK, DEFAULT_ANCHORS,
                      DEFAULT_COUNT_BIAS, DEFAULT_SEGMENTS, check_anchor_topk, resolve_count_bias,
                      TokenRoles, check_policy, is_dynamic, resolve, resolve_anchors)
from .costs.comm import MATCHED_BIASES, check_wire_dtype
from .plan import PrismPlan, check_compression_rate, make_plan

AVERAGING = ("attention_input", "block_input")
# "auto" (anchors.resolve_count_bias); "log": the paper's log-count bias; "matched" /
# "matched_half" / "matched_shared" / "matched_cls" (rows matched at the mean query or the
# [CLS] query, data-dependent segments only, hf/matched_summary.py); "spread", an experiment of the simulation (hf/spread_bias.py)
COUNT_BIASES = ("auto", "log", "spread") + MATCHED_BIASES
DEFAULT_AVERAGING = "attention_input"


@dataclass(frozen=True)
class PrismConfig:
    num_partitions: int = 2
    num_means: Optional[int] = None
    compression_rate: Optional[float] = None
    averaging: str = DEFAULT_AVERAGING
    backend: str = "auto"
    partition_weights: Optional[Tuple[float, ...]] = None
    anchors: str = DEFAULT_ANCHORS
    segments: str = DEFAULT_SEGMENTS
    anchor_budget: str = DEFAULT_ANCHOR_BUDGET
    count_bias: str = DEFAULT_COUNT_BIAS
    wire_dtype: str = "fp32"
    anchor_topk: Union[int, str] = DEFAULT_ANCHOR_TOPK
    anchor_score: str = DEFAULT_ANCHOR_SCORE

    def __post_init__(self):
        P = self.num_partitions
        if isinstance(P, bool) or not isinstance(P, numbers.Integral) or P < 1:
            raise ValueError(f"num_partitions must be an integer >= 1, got {P!r}")
        if (self.num_means is None) == (self.compression_rate is None):
            raise ValueError("give exactly one of num_means (means per partition) or compression_rate")
        if self.num_means is not None:
            m = self.num_means
            if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
                raise ValueError(f"num_means must be an integer >= 1, got {m!r}")
        if self.compression_rate is not None:
            check_compression_rate(self.compression_rate)
        if self.averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {self.averaging!r}")
        check_policy(self.anchors, self.segments, self.anchor_budget)
        if self.count_bias not in COUNT_BIASES:
            raise ValueError(f"count_bias must be one of {COUNT_BIASES}, got {self.count_bias!r}")
        # "auto": the best measured policy that this averaging and bias allow (anchors.resolve_anchors)
        object.__setattr__(self, "anchors", resolve_anchors(self.anchors, self.averaging, self.count_bias))
        object.__setattr__(self, "anchor_topk", check_anchor_topk(self.anchor_topk))
        if self.anchor_score not in ANCHOR_SCORES:
            raise ValueError(f"anchor_score must be one of {ANCHOR_SCORES}, got {self.anchor_score!r}")
        if self.dynamic and (self.averaging != "attention_input" or self.count_bias == "spread"):
            raise ValueError(f"anchors={self.anchors!r}, segments={self.segments!r} (data-dependent segments, "
                             "chosen from each layer's keys) need averaging='attention_input' and "
                             f"count_bias one of 'log', {', '.join(map(repr, MATCHED_BIASES))}")
        if self.count_bias in MATCHED_BIASES and not self.dynamic:
            raise ValueError(f"count_bias={self.count_bias!r} needs data-dependent segments (anchors="
                             f"'special+topk' or segments 'content' / 'content_sse' / 'kmeans'), got "
                             f"anchors={self.anchors!r}, segments={self.segments!r}")
        check_wire_dtype(self.wire_dtype)
        from .api import BACKENDS
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.partition_weights is not None:
            w = tuple(float(x) for x in self.partition_weights)
            if len(w) != P:
                raise ValueError(f"partition_weights must have one weight per partition ({P}), got {len(w)}")
            object.__setattr__(self, "partition_weights", w)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value) -> "PrismConfig":
        if isinstance(value, PrismConfig):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(f"expected a PrismConfig or a dict of its fields, got {type(value).__name__}")

    @property
    def dynamic(self) -> bool:
        """True when each device picks its segments from the layer's keys
        (anchors="special+topk" or segments="content" / "content_sse" / "kmeans",
        prism_kernels/dynamic.py), in the simulation and the runtime alike. The plan
        then fixes the rows m_j and the special anchors only, and each row's count
        travels with it."""
        return is_dynamic(self.anchors, self.segments)

    def bias_for(self, causal: bool, roles: Optional[TokenRoles] = None) -> str:
        """The count bias applied to a model: "auto" resolved by whether it is causal and
        whether it has a patch grid (`roles`; None: text), anchors.resolve_count_bias."""
        vision = roles is not None and roles.patch_grid is not None
        return resolve_count_bias(self.count_bias, self.dynamic, causal, vision, self.compression_rate == 1.0)

    @property
    def plain_means(self) -> bool:
        """True for the paper's segments: no anchors, contiguous runs."""
        return self.anchors == "none" and self.segments == "runs"

    def plan(self, n_tokens: int, causal: bool, num_partitions: Optional[int] = None,
             roles: Optional[TokenRoles] = None, static: bool = False) -> PrismPlan:
        """The plan for a sequence of n_tokens. A sequence shorter than P runs on
        as many devices as it has tokens (`num_partitions` overrides P). `roles`:
        the model's special tokens and patch grid (None: text whose first token is
        its only special token). A data-dependent policy (`dynamic`) has no plan of
        its own: the callers that choose the segments per layer (the simulation and
        the runtime, prism_kernels/dynamic.py) ask for its static part (static=True);
        any other caller is refused, since the plan's segments would not be the ones sent."""
        if self.dynamic and not static:
            raise ValueError(f"anchors={self.anchors!r}, segments={self.segments!r}: data-dependent segments "
                             "have no fixed plan (each device chooses them from its keys in every layer); "
                             "ask for the static part with plan(..., static=True)")
        P = min(num_partitions or self.num_partitions, n_tokens)
        anchors, grid = resolve(n_tokens, roles, self.anchors, self.segments)
        kw = dict(num_means=self.num_means, compression_rate=self.compression_rate, causal=causal,
                  anchors=anchors, grid=grid, anchor_budget=self.anchor_budget)
        if self.partition_weights is not None and P == self.num_partitions:
            return make_plan(n_tokens, weights=self.partition_weights, **kw)
        return make_plan(n_tokens, P, **kw)

"""The command-line flags of the segment policy (PrismConfig's anchors, segments,
anchor_budget, anchor_topk, anchor_score, count_bias), defined once for `prism run`, `prism
generate` and `prism costs`. No torch import: `prism costs` stays light."""
from __future__ import annotations

import argparse

from .anchors import (ANCHOR_BUDGETS, ANCHOR_SCORES, ANCHORS, DEFAULT_ANCHOR_BUDGET, DEFAULT_ANCHOR_SCORE,
                      DEFAULT_ANCHOR_TOPK, DEFAULT_ANCHORS, DEFAULT_COUNT_BIAS, DEFAULT_SEGMENTS, SEGMENTS)
from .costs.comm import MATCHED_BIASES

# the biases the runtime applies ("spread" is an experiment of the simulation only)
RUNTIME_COUNT_BIASES = ("auto", "log") + MATCHED_BIASES


def _topk_arg(text: str):
    """An integer where the text is one; anything else stays text for validate() to refuse."""
    try:
        return int(text)
    except ValueError:
        return text


def add_policy_arguments(p: argparse.ArgumentParser):
    """Which tokens are sent alone and how the others are grouped. A text that is not
    "auto" or an integer stays in args.anchor_topk for the command to refuse
    (anchors.check_anchor_topk, naming --anchor-topk)."""
    p.add_argument("--anchors", default=DEFAULT_ANCHORS, choices=ANCHORS,
                   help="tokens sent alone instead of averaged: auto (default) = special+topk, or "
                        "special with --averaging block_input; special = the model's special tokens "
                        "([CLS], [SEP], a decoder's first token); first; none (the paper's plain means); "
                        "special+topk = also the --anchor-topk tokens of each partition with the largest "
                        "--anchor-score, chosen per layer; docs/method.md, \"Anchors and 2-D segments\"")
    p.add_argument("--segments", default=DEFAULT_SEGMENTS, choices=SEGMENTS,
                   help="segment shapes: auto (default) = 2-D blocks of the patch grid for vision models; "
                        "for text, runs cut where the keys change when the anchors are chosen per layer, "
                        "else equal runs; runs = equal runs everywhere (the paper's); content, "
                        "content_sse, kmeans = chosen per layer from each partition's keys. Segments "
                        "chosen per layer send their counts with the means (4 bytes a row)")
    p.add_argument("--anchor-budget", default=DEFAULT_ANCHOR_BUDGET, choices=ANCHOR_BUDGETS,
                   help="anchors out of the partition's m means (shared, default) or on top (extra)")
    p.add_argument("--anchor-topk", type=_topk_arg, default=DEFAULT_ANCHOR_TOPK,
                   help="with --anchors special+topk: tokens per partition sent alone besides the special ones "
                        "(auto, default: 1 for vision models, 6 for text; or an integer >= 0)")
    p.add_argument("--anchor-score", default=DEFAULT_ANCHOR_SCORE, choices=ANCHOR_SCORES,
                   help="with --anchors special+topk: key_norm = ||k||, key_dev = ||k - the partition's mean "
                        "key||, auto (default) = key_norm on a patch grid (images), key_dev for text")
    p.add_argument("--count-bias", default=DEFAULT_COUNT_BIAS, choices=RUNTIME_COUNT_BIASES,
                   help="auto (default) = matched for text encoders, matched_cls for images, log for "
                        "decoders; log = the paper's log-count bias; matched / matched_half / matched_shared = "
                        "each segment's keys and values weighted at its partition's mean query, with a bias per "
                        "KV head instead of the count; matched_cls = weighted at the [CLS] query instead (needs "
                        "segments chosen per layer; K/V rows plus one float per KV head on the wire; "
                        "docs/method.md, \"Rows matched at the mean query\")")

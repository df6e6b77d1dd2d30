"""Rename stored `prism eval` cells after a package default changed.

A cell's key names only the options given on the command line; the rest were the
package's defaults *when it ran*. When a default changes, the cells that ran under the
earlier one are renamed so that their key says what they ran, and rerunning a key gives
the same configuration under the new defaults. Each change is applied once, by name:

  * `special` (anchors "auto" became the special tokens + the top-1 key chosen per
    layer; anchor_score "auto"): attention_input cells with the log-count bias and no
    `anchors` option get `anchors=special` (what "auto" meant before; block_input and
    the spread bias still resolve "auto" to "special", so those keys stay);
    `anchors=special+topk` cells without `anchor_score` get `anchor_score=key_norm`.
  * `text-topk` (anchor_topk "auto": four top-k anchors for text instead of one; images
    keep one): in the text tasks' files (minilm-*, smollm2-*), cells whose anchors
    resolve to special+topk and that name no `anchor_topk` get `anchor_topk=1`.
  * `text-matched` (count_bias "auto": rows matched at the mean query for text encoders
    with data-dependent segments; decoders and images kept the log-count bias): in the
    MiniLM tasks' files (minilm-*), cells with data-dependent segments that name no
    `count_bias` get `count_bias=log`.

  * `image-matched-cls` (count_bias "auto": rows matched at the [CLS] query for vision
    encoders with data-dependent segments): in the DINOv2 tasks' files (dinov2-*), cells
    with data-dependent segments that name no `count_bias` get `count_bias=log`.

Usage: python benchmarks/accuracy/migrate_default_keys.py CHANGE FILE.json ...
(each renamed file's accuracy_<task>.md and .png are rendered again).
"""
import json
import os
import sys

from prism_kernels.anchors import DYNAMIC_SEGMENTS


def _split(key: str):
    parts = key.split("|")
    opts = dict(kv.split("=", 1) for kv in parts[4][len("opt="):].split(",")) if len(parts) > 4 else {}
    return parts, opts


def _join(parts, opts) -> str:
    head = "|".join(parts[:4])
    return head + ("|opt=" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) if opts else "")


def _keys_resolve_to_topk(avg: str, opts: dict) -> bool:
    eff_avg = opts.get("averaging", avg)
    anchors = opts.get("anchors", "auto")
    return anchors == "special+topk" or (anchors == "auto" and eff_avg == "attention_input"
                                         and opts.get("count_bias", "log") == "log")


def migrate_special(key: str, path: str = "") -> str:
    parts, opts = _split(key)
    if parts[0] != "prism":
        return key
    avg = parts[3].split("=", 1)[1]
    eff_avg = opts.get("averaging", avg)
    if "anchors" not in opts and eff_avg == "attention_input" and opts.get("count_bias", "log") == "log":
        opts["anchors"] = "special"
    if opts.get("anchors") == "special+topk" and "anchor_score" not in opts:
        opts["anchor_score"] = "key_norm"
    return _join(parts, opts)


def migrate_text_topk(key: str, path: str = "") -> str:
    parts, opts = _split(key)
    name = os.path.basename(path)
    if parts[0] != "prism" or not name.startswith(("accuracy_minilm-", "accuracy_smollm2-")):
        return key
    if "anchor_topk" not in opts and _keys_resolve_to_topk(parts[3].split("=", 1)[1], opts):
        opts["anchor_topk"] = "1"
    return _join(parts, opts)


def migrate_text_matched(key: str, path: str = "", prefix: str = "accuracy_minilm-") -> str:
    parts, opts = _split(key)
    name = os.path.basename(path)
    if parts[0] != "prism" or not name.startswith(prefix) or "count_bias" in opts:
        return key
    dynamic = _keys_resolve_to_topk(parts[3].split("=", 1)[1], opts) or \
        opts.get("segments") in DYNAMIC_SEGMENTS
    if dynamic:
        opts["count_bias"] = "log"
    return _join(parts, opts)


def migrate_image_matched_cls(key: str, path: str = "") -> str:
    return migrate_text_matched(key, path, prefix="accuracy_dinov2-")


CHANGES = {"special": migrate_special, "text-topk": migrate_text_topk, "text-matched": migrate_text_matched,
           "image-matched-cls": migrate_image_matched_cls}


def main(argv):
    if len(argv) < 2 or argv[0] not in CHANGES:
        raise SystemExit(f"usage: migrate_default_keys.py {{{','.join(CHANGES)}}} FILE.json ...")
    migrate = CHANGES[argv[0]]
    for path in argv[1:]:
        with open(path) as f:
            d = json.load(f)
        cells = d["cells"]
        renamed = {}
        for k in list(cells):
            new = migrate(k, path)
            if new != k:
                if new in cells:
                    raise SystemExit(f"{path}: {new} exists already")
                renamed[k] = new
        d["cells"] = {renamed.get(k, k): v for k, v in cells.items()}
        with open(path, "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)         # as prism_kernels.eval.store writes it
        for k, v in renamed.items():
            print(f"{path}: {k} -> {v}")
        if renamed:     # the file's table and plot, rendered again under the new names
            from prism_kernels.eval.report import write_report
            from prism_kernels.eval.store import ResultStore
            task = os.path.basename(path)[len("accuracy_"):-len(".json")]
            write_report(ResultStore(path), os.path.dirname(path) or ".", task)


if __name__ == "__main__":
    main(sys.argv[1:])

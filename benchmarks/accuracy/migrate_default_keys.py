"""Rename stored `prism eval` cells after the package default changed (anchors "auto":
special tokens + the top-1 key chosen per layer, anchor_score "auto").

A cell's key names only the options given on the command line; the rest were the
package's defaults *when it ran*. Cells that ran under the earlier defaults (anchors
"special", anchor_score "key_norm") are renamed so that their key says so, and rerunning
a key gives the same configuration under the new defaults:
  * attention_input cells with the log-count bias and no `anchors` option get
    `anchors=special` (what "auto" meant before; block_input and the spread bias still
    resolve "auto" to "special", so those keys stay);
  * `anchors=special+topk` cells without `anchor_score` get `anchor_score=key_norm`.
Usage: python benchmarks/accuracy/migrate_default_keys.py FILE.json ...   (idempotent)
"""
import json
import sys


def migrate(key: str) -> str:
    parts = key.split("|")
    if parts[0] != "prism":
        return key
    avg = parts[3].split("=", 1)[1]
    opts = dict(kv.split("=", 1) for kv in parts[4][len("opt="):].split(",")) if len(parts) > 4 else {}
    eff_avg = opts.get("averaging", avg)
    if "anchors" not in opts and eff_avg == "attention_input" and opts.get("count_bias", "log") == "log":
        opts["anchors"] = "special"
    if opts.get("anchors") == "special+topk" and "anchor_score" not in opts:
        opts["anchor_score"] = "key_norm"
    head = "|".join(parts[:4])
    return head + ("|opt=" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) if opts else "")


def main(paths):
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        cells = d["cells"]
        renamed = {}
        for k in list(cells):
            new = migrate(k)
            if new != k:
                if new in cells:
                    raise SystemExit(f"{path}: {new} exists already")
                renamed[k] = new
        d["cells"] = {renamed.get(k, k): v for k, v in cells.items()}
        with open(path, "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)         # as prism_kernels.eval.store writes it
        for k, v in renamed.items():
            print(f"{path}: {k} -> {v}")


if __name__ == "__main__":
    main(sys.argv[1:])

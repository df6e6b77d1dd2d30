"""Many small scenarios in one process group (used by tests/test_distributed.py so
that each process pays the torch/transformers import once).

    RANK=r WORLD_SIZE=P MASTER_ADDR=127.0.0.1 MASTER_PORT=... \
        python -m prism_kernels.distributed.selftest OUT.pt SCENARIOS_JSON

SCENARIOS_JSON: a list of {"name", "family", "mode", "num_means"|"cr", "averaging",
"anchors", "segments", "anchor_budget", "anchor_topk", "anchor_score", "count_bias", "weights", "overlap", "seq_len", "wire_dtype", "input",
"pixels"}
(absent keys: the defaults). Rank 0 saves {name: {"hidden", "head", "reports", "inputs"}} to OUT.pt.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta


def main(argv):
    out_path, scen = argv[0], json.loads(argv[1])
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from ..config import PrismConfig
    from ..models import lookup
    from . import overlap
    from .comm import Comm
    from .runtime import Runtime, RunConfig
    overlap.register()
    results, models = {}, {}
    for s in scen:
        entry = lookup(s["family"])
        if s["family"] not in models:
            models[s["family"]] = entry.build_model("tiny", seed=0)
        model = models[s["family"]]
        model.set_attn_implementation("sdpa" if s["mode"] == "single" else overlap.ATTN_NAME)
        inputs = entry.make_input(model.config, s.get("seq_len", 13), seed=0, pixels=s.get("pixels", "float"))
        prism = None
        if s["mode"] == "prism":
            prism = PrismConfig(num_partitions=world, num_means=s.get("num_means"), compression_rate=s.get("cr"),
                                averaging=s.get("averaging", "attention_input"),
                                partition_weights=s.get("weights"),
                                **{k: s[k] for k in ("anchors", "segments", "anchor_budget", "anchor_topk",
                                                    "anchor_score", "count_bias") if k in s})
        cfg = RunConfig(mode=s["mode"], prism=prism, overlap=s.get("overlap", True), gather="all",
                        wire_dtype=s.get("wire_dtype", "fp32"), input=s.get("input", "raw"))
        # every rank makes the same input, but only its shape and dtype are used off rank 0
        rt = Runtime(model, Comm(timeout_s=60), cfg, entry.n_tokens(model, inputs),
                     input_shape=inputs.shape, input_dtype=inputs.dtype)
        res = rt.forward(inputs if rank == 0 or cfg.input == "local" else None)
        plan = rt.plan
        rep = {"rank": rank, "layer_bytes": rt.comm.bytes.per_layer("layer"),
               "expected": rt.expected_layer_bytes() if plan is not None else 0,
               "startup_bytes": rt.comm.bytes.recv.get(("scatter", 0), 0),
               "expected_startup": rt.expected_startup_bytes(), "input": cfg.input,
               "wire": rt.wire, "wire_dtype": cfg.wire_dtype, "averaging": rt.averaging,
               "means": list(plan.means) if plan is not None else None,
               "tokens_received": plan.devices[rank].tokens_received if plan is not None else 0,
               "sizes": list(plan.sizes) if plan is not None else None}
        reps = [None] * world
        dist.all_gather_object(reps, rep)
        if rank == 0:
            results[s["name"]] = {"hidden": res["hidden"], "head": res["head"], "reports": reps, "inputs": inputs}
    dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    # as prism run: leave without gloo's teardown, which aborts now and then ("terminate
    # called without an active exception") when a peer has already left
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

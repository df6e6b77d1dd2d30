"""Before any compute: every rank shows its model, config and run settings; all
must agree with rank 0, and the run must make sense (P <= N). Otherwise every
rank refuses with the same message, naming the ranks that differ."""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Dict, Optional

import torch
import torch.distributed as dist


class ConfigRefused(RuntimeError):
    pass


def weights_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint of all parameters and buffers (sum, sum of squares and a
    strided sample of each tensor, in fp64)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.state_dict().items()):
            f = t.detach().reshape(-1).to(torch.float64)
            sample = f[:: max(1, f.numel() // 64)][:64]
            h.update(name.encode())
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(repr((round(float(f.sum()), 6), round(float((f * f).sum()), 6))).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def config_digest(config) -> str:
    d = config.to_dict()
    for k in ("_attn_implementation", "_attn_implementation_internal", "attn_implementation",
              "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model, settings: Dict) -> Dict:
    import transformers
    return {
        "model_class": type(model).__name__,
        "config": config_digest(model.config),
        "weights": weights_checksum(model),
        "settings": json.dumps(settings, sort_keys=True),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def input_digest(inputs) -> str:
    """A short digest of an input tensor's shape, dtype and values (input 'local': every
    rank must hold the same input)."""
    t = inputs.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def handshake(model, settings: Dict, n_tokens: Optional[int], error: Optional[str] = None,
              timeout_s: float = 60.0, input_meta: Optional[Dict] = None, input_digest: Optional[str] = None):
    """All ranks exchange fingerprints; returns (N, input_meta) from rank 0 (input_meta:
    the input's shape and dtype, which the other ranks need to receive their slice of
    the raw input; input_digest: given by every rank with input 'local', which must all
    hold the same input). Raises ConfigRefused on every rank when a rank differs from rank 0
    or rank 0 reports an error."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = fingerprint(model, settings)
    mine["rank"] = rank
    mine["n_tokens"] = n_tokens if rank == 0 else None
    mine["input_meta"] = input_meta if rank == 0 else None
    mine["error"] = error
    mine["input_digest"] = input_digest
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    errors = [f"rank {f['rank']}: {f['error']}" for f in everyone if f.get("error")]
    if errors:
        raise ConfigRefused("refused before any compute: " + "; ".join(errors))
    ref = everyone[0]
    diffs = []
    for f in everyone[1:]:
        fields = [k for k in ("model_class", "config", "weights", "settings", "torch", "transformers")
                  if f[k] != ref[k]]
        if f["input_digest"] != ref["input_digest"]:
            diffs.append(f"rank {f['rank']} holds another input than rank 0 (input 'local': every rank "
                         f"embeds its slice of its own copy, so all copies must be the same)")
        if fields:
            diffs.append(f"rank {f['rank']} differs from rank 0 in {', '.join(fields)}")
    if diffs:
        raise ConfigRefused("refused before any compute: " + "; ".join(diffs))
    n = ref["n_tokens"]
    if n is not None and world > n:
        raise ConfigRefused(f"refused before any compute: {world} partitions (world size) for {n} tokens; "
                            f"P must be <= the number of tokens")
    return n, ref["input_meta"]

"""Communication per layer: tokens and bytes each device receives (PDPLC), and
the width of a row on the wire (docs/method.md, "Costs" and "What is averaged").

Voltage: device i all-gathers every other partition's hidden states, N - n_i rows.
Prism:   device i receives the segment means of every other partition,
         sum_{j != i} m_j rows (the paper's tables count all of them).
         In causal models a device only needs the means of earlier partitions
         (later ones are fully masked), sum_{j < i} m_j: `causal=True` plans.
The repetition counts need not travel with a static plan: they follow from
(n_j, m_j), which every device knows. Data-dependent segments (anchors
"special+topk", segments "content" / "content_sse" / "kmeans", prism_kernels/dynamic.py)
change them from layer to layer and sequence to sequence, so each row then also
carries its count: COUNT_BYTES (int32) more per row (`row_bytes(..., counts=True)`).
Bytes = rows x (floats per row x bytes per element [+ COUNT_BYTES]), a row being
  "hidden": D floats (Voltage's rows; Prism's block_input means, and its
            attention_input means of non-rotary models when D <= 2*Hkv*d), or
  "kv":     2*Hkv*d floats (K/V means: rotary models under attention_input, the
            only exact choice there; non-rotary models when that is smaller);
  "matched": 2*Hkv*d + Hkv floats (count_bias "matched*": each segment's keys and
            values weighted at the sending partition's mean query, or at the [CLS]
            query for "matched_cls", and per KV head the bias that replaces log c; no
            count travels, docs/method.md). With "matched_cls" every device but the
            first also receives, per layer, the first token's query (H*d floats in
            the compute dtype: `first_token_bytes`).
Bytes per element: the wire dtype (WIRE_DTYPES; `row_bytes`). The runtime
(prism_kernels.distributed) sends exactly these rows, cast to the wire dtype.

Start-up (once per inference, before the first layer; `startup_bytes`): rank 0 holds
the input and sends device i >= 1 either its partition's hidden states ("hidden":
n_i rows of D floats in the compute dtype) or the part of the raw input it embeds
itself ("raw": its n_i token ids; for an image the pixel rows of the patch rows its
tokens lie in, whole rows of the image, so a little more than its patches).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

DTYPE_BYTES: Dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "fp8": 1}

# Element types the runtime can put on the wire (`prism run --wire-dtype`); the cost
# model may price the others in DTYPE_BYTES too. fp32 first: the default.
WIRE_DTYPES = ("fp32", "fp16", "bf16")

# segments summarised at a query (hf/matched_summary.py): their rows travel as
# "matched" K/V rows with a bias per KV head
MATCHED_BIASES = ("matched", "matched_half", "matched_shared", "matched_cls")
# ... of which these are matched at the query of the sequence's first token ([CLS]): the
# device that holds it sends that token's query (H*d floats in the compute dtype) to every
# other device in each layer, before their rows can be built (first_token_bytes)
MATCHED_AT_FIRST_TOKEN = ("matched_cls",)


def received_tokens(plan) -> List[int]:
    """Prism: rows (segment means) device i receives per layer, for a PrismPlan.

    A causal plan (plan_layout(..., causal=True)) lists only earlier partitions'
    means, so this gives the causal runtime's figure; a non-causal plan gives the
    paper's sum_{j != i} m_j.
    """
    return [d.tokens_received for d in plan.devices]


def voltage_received_tokens(sizes: Sequence[int]) -> List[int]:
    """Voltage: rows (full hidden states) device i receives per layer, N - n_i."""
    n = sum(sizes)
    return [n - s for s in sizes]


INPUT_DTYPE_BYTES: Dict[str, int] = {"int64": 8, "int32": 4, "fp32": 4, "fp16": 2, "bf16": 2, "uint8": 1}
STARTUP_INPUTS = ("raw", "hidden", "local")


def _vision_geometry(config):
    """(channels, image height, width, patch height, width, leading tokens) or None for text."""
    if getattr(config, "patch_size", None) is None or getattr(config, "image_size", None) is None:
        return None
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    (h, w), (ph, pw) = pair(config.image_size), pair(config.patch_size)
    leading = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return int(getattr(config, "num_channels", 3)), h, w, ph, pw, leading


def startup_bytes(config, sizes: Sequence[int], input: str = "raw", *, input_bytes: int = None,
                  hidden_bytes: int = 4, batch: int = 1) -> List[int]:
    """Bytes each device receives before the first layer (rank 0: 0, it holds the input).

    hidden: n_i rows of D elements of `hidden_bytes` (the compute dtype, fp32: 4).
    raw:    text: n_i token ids of `input_bytes` (int64: 8, the default);
            image: the pixel rows of every patch row holding one of device i's
            patches (its first tokens may be [CLS] / registers, which need no pixels),
            x image width x channels x `input_bytes` (fp32 pixel_values: 4, the default;
            uint8: 1).
    local:  0 for every device: each holds its own slice of the input already (a sensor
            or a text shard of its own) and embeds it."""
    if input not in STARTUP_INPUTS:
        raise ValueError(f"input must be one of {STARTUP_INPUTS}, got {input!r}")
    geo = _vision_geometry(config)
    if input_bytes is None:
        input_bytes = 4 if geo is not None else 8
    out, start = [], 0
    for i, n in enumerate(sizes):
        stop = start + n
        if i == 0 or input == "local":
            b = 0
        elif input == "hidden":
            b = n * config.hidden_size * hidden_bytes
        elif geo is None:
            b = n * input_bytes
        else:
            c, h, w, ph, pw, lead = geo
            per_row = w // pw                      # patches per grid row
            first, last = max(start, lead) - lead, stop - 1 - lead     # patch indices
            rows = 0 if last < first else last // per_row - first // per_row + 1
            b = rows * ph * w * c * input_bytes
        out.append(int(b) * batch)
        start = stop
    return out


def bytes_for(tokens: int, hidden_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of `tokens` hidden-state rows of width hidden_size."""
    return int(tokens) * int(hidden_size) * int(dtype_bytes)


def _rotary(config) -> bool:
    from ..models import TABLE
    entry = TABLE.get(getattr(config, "model_type", None))
    if entry is not None:
        return entry.rotary
    return any(getattr(config, a, None) is not None for a in ("rope_theta", "rope_parameters", "rope_scaling"))


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_width(config) -> int:
    """2 * Hkv * d: floats of one row of keys and values."""
    return 2 * kv_heads(config) * head_dim(config)


def wire_format(config, mode: str = "prism", averaging: str = "attention_input", count_bias: str = "log") -> str:
    """'hidden' (D floats per row), 'kv' (2*Hkv*d floats per row) or 'matched' (the K/V
    rows matched at the mean query and one bias per KV head, 2*Hkv*d + Hkv floats)."""
    if mode == "voltage" or averaging == "block_input":
        return "hidden"
    if count_bias in MATCHED_BIASES:
        return "matched"
    if _rotary(config) or kv_width(config) < config.hidden_size:
        return "kv"
    return "hidden"


def floats_per_row(config, wire: str) -> int:
    if wire == "hidden":
        return config.hidden_size
    return kv_width(config) + (kv_heads(config) if wire == "matched" else 0)


def receiver_projects(wire: str) -> bool:
    """Whether a receiver runs its K/V projections on the rows of this wire format: on
    hidden rows (attention-input or block-input means, Voltage's rows), not on the keys and
    values of "kv" and "matched", which the sender averaged from its own."""
    return wire == "hidden"


def check_wire_dtype(wire_dtype, name: str = "wire_dtype") -> str:
    """wire_dtype if it is one of WIRE_DTYPES, else ValueError naming `name` and the choices."""
    if not isinstance(wire_dtype, str) or wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
    return wire_dtype


def wire_torch_dtype(wire_dtype: str):
    """The torch dtype of a wire dtype name ('fp16' -> torch.float16)."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[check_wire_dtype(wire_dtype)]


def first_token_bytes(config, count_bias: str, holder: bool, batch: int = 1, compute_bytes: int = 4) -> int:
    """Bytes per layer of the first token's query that a device receives for rows matched at
    the [CLS] query (MATCHED_AT_FIRST_TOKEN): H * d elements of the compute dtype per
    sequence, on every device but the one that holds the token (`holder`); else 0."""
    if count_bias not in MATCHED_AT_FIRST_TOKEN or holder:
        return 0
    return int(batch) * int(config.num_attention_heads) * head_dim(config) * int(compute_bytes)


# a segment's count on the wire (int32: exact for any sequence length), sent with each
# row when the segments are data-dependent
COUNT_BYTES = 4


def row_bytes(config, wire: str, wire_dtype: str = "fp32", counts: bool = False) -> int:
    """Bytes of one row on the wire: floats per row x bytes per element of the wire dtype,
    plus its count (COUNT_BYTES) when the segments are data-dependent (`counts`)."""
    return floats_per_row(config, wire) * DTYPE_BYTES[check_wire_dtype(wire_dtype)] + (COUNT_BYTES if counts else 0)


def dtype_bytes(dtype) -> int:
    """Bytes per element of 'fp32' / 'fp16' / 'bf16' / ..., a torch.dtype, or an int."""
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)} (or bytes per element), got {dtype!r}")

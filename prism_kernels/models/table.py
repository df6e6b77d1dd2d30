"""One table of the Hugging Face model types Prism runs block by block.

Every part of the package that has to know a model's structure reads it here:
the runtime (prism_kernels.distributed), the cost model (prism_kernels.costs) and
the one-process simulation's `block_input` averaging (prism_kernels.hf). An entry,
keyed by `config.model_type`, says

  * how to build a random-weight config (sizes tiny / small / base) and the model class;
  * kind: "encoder" (bidirectional text), "causal" (decoder, LM head) or "vision";
  * where the blocks are, and per block its attention module and pre-attention
    norm (None for post-LN BERT / RoBERTa);
  * how rows of attention input become keys and values [B, Hkv, r, d] (the
    model's own K/V weights, biases included), and for rotary models how to get
    cos / sin at global positions;
  * how to embed the input at global positions, run one block on local rows,
    and the final norm and head;
  * where its special tokens and patch grid are (`roles`, for the anchor and
    segment-shape policies of prism_kernels.anchors).

Adding a family is one `ModelType(...)` in TABLE. `lookup(model_or_config)` finds
the entry of a model, a config or a model-type name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..anchors import TEXT, TokenRoles

# Random-config sizes. "tiny" for tests; "base" matches ViT-B/16, BERT-base, GPT-2 small.
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, inter=64, vocab=97, image=32, patch=8),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=512, vocab=1000, image=64, patch=16),
    "base": dict(hidden=768, layers=12, heads=12, kv_heads=4, inter=3072, vocab=30522, image=224, patch=16),
}


def _get(obj, path: Optional[str]):
    if path is None:
        return None
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, r, H*d] -> [B, H, r, d]."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(-3, -2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k [B, H, r, d] rotated by cos / sin [B or 1, r, d] (the model's own rotation
    when they are a token's; an average rotation when they are segment means)."""
    cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
    return k * cos + rotate_half(k) * sin


# ---- K/V projections: rows of attention input x [B, r, D] -> (K, V) [B, Hkv, r, d], no rotary

def _kv_bert(attn, x):
    hd = attn.attention_head_size
    return _heads(attn.key(x), hd), _heads(attn.value(x), hd)


def _kv_proj(attn, x):            # ViT, DINOv2, Llama, Qwen2 (bias when the model has one)
    return _heads(attn.k_proj(x), attn.head_dim), _heads(attn.v_proj(x), attn.head_dim)


def _kv_gpt2(attn, x):            # Conv1D c_attn: x @ W + b, W [D, 3D]; only the K/V columns
    D = attn.split_size
    w, b = attn.c_attn.weight, attn.c_attn.bias
    kv = torch.addmm(b[D:], x.reshape(-1, D), w[:, D:]).view(*x.shape[:-1], 2 * D)
    k, v = kv.split(D, dim=-1)
    return _heads(k, attn.head_dim), _heads(v, attn.head_dim)


# ---- embeddings: all rows, or the rows of token ids at their global positions

def _positions(inputs, positions):
    if positions is None:
        positions = torch.arange(inputs.shape[1], device=inputs.device)
    return positions.view(1, -1)


def _embed_bert(model, ids, positions):
    return model.embeddings(input_ids=ids, position_ids=_positions(ids, positions))


def _embed_roberta(model, ids, positions):
    # RoBERTa's position ids start at padding_idx + 1 (inputs hold no padding token)
    return model.embeddings(input_ids=ids, position_ids=_positions(ids, positions) + model.config.pad_token_id + 1)


def _embed_image(model, pixel_values, positions):
    if positions is not None:
        raise ValueError("vision models embed the whole image (patch positions are fixed)")
    return model.embeddings(pixel_values)


def _positions_vit(emb, height, width, n_patches):
    # ViTEmbeddings.forward adds its table as is unless asked to interpolate (the runtime never asks)
    return emb.position_embeddings


def _positions_dinov2(emb, height, width, n_patches):
    # Dinov2Embeddings.forward always goes through interpolate_pos_encoding (the identity at
    # the configured size); only the shape of its first argument is read
    like = torch.empty(1, n_patches + 1, emb.position_embeddings.shape[-1], device="meta")
    return emb.interpolate_pos_encoding(like, height, width)


def _image_grid(model_or_config, shape):
    """(patch height, patch width, patches per row, patches) of an image of `shape` [B, C, H, W]."""
    cfg = getattr(model_or_config, "config", model_or_config)
    p = cfg.patch_size
    ph, pw = tuple(p) if isinstance(p, (tuple, list)) else (p, p)
    gw = shape[3] // pw
    return ph, pw, gw, (shape[2] // ph) * gw


def _image_rows(positions_fn):
    """Rows [start, stop) of the embedding of an image, from the pixel rows of the patch rows
    they cover (`strip`, ModelType.input_slice): the model's own conv on the strip, the
    rows of the position table of the whole image, [CLS] (+ its position) for row 0."""
    def embed_rows(model, strip, start, stop, shape):
        emb = model.embeddings
        _, _, gw, n_patches = _image_grid(model, shape)
        pos = positions_fn(emb, shape[2], shape[3], n_patches)
        rows = []
        if start == 0:
            rows.append(emb.cls_token.expand(strip.shape[0], -1, -1) + pos[:, :1])
        p0, p1 = max(start, 1) - 1, stop - 1             # patch indices of tokens [start, stop)
        if p1 > p0:
            first = (p0 // gw) * gw                        # the strip starts at this patch
            patches = emb.patch_embeddings(strip)[:, p0 - first:p1 - first]
            rows.append(patches + pos[:, 1 + p0:1 + p1])
        return emb.dropout(torch.cat(rows, dim=1))
    return embed_rows


def _embed_gpt2(model, ids, positions):
    t = model.transformer
    return t.drop(t.wte(ids) + t.wpe(_positions(ids, positions)))


def _embed_decoder(model, ids, positions):
    return model.model.embed_tokens(ids)


# ---- one block on local rows h [B, n, D] at global positions [n]

def _run_plain(entry, model, block, h, positions):
    return block(h, None)


def _run_gpt2(entry, model, block, h, positions):
    return block(h, attention_mask=None)


def _run_rotary(entry, model, block, h, positions):
    return block(h, attention_mask=None, position_ids=positions.view(1, -1),
                 position_embeddings=entry.cos_sin(model, positions, h))


# ---- configs

def _cfg_bert(tf, s, size):
    return tf.BertConfig(vocab_size=s["vocab"], intermediate_size=s["inter"], max_position_embeddings=512,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_common(s))


def _cfg_roberta(tf, s, size):
    return tf.RobertaConfig(vocab_size=s["vocab"] if size != "base" else 50265, intermediate_size=s["inter"],
                            max_position_embeddings=514, pad_token_id=1, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **_common(s))


def _cfg_vit(tf, s, size):
    return tf.ViTConfig(image_size=s["image"], patch_size=s["patch"], intermediate_size=s["inter"],
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_common(s))


def _cfg_dinov2(tf, s, size):
    return tf.Dinov2Config(image_size=s["image"], patch_size=s["patch"], mlp_ratio=4,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_common(s))


def _cfg_gpt2(tf, s, size):
    vocab = s["vocab"] if size != "base" else 50257
    return tf.GPT2Config(vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1, n_positions=1024,
                         n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _cfg_llama(tf, s, size):
    return tf.LlamaConfig(vocab_size=s["vocab"] if size != "base" else 32000, intermediate_size=s["inter"],
                          num_key_value_heads=s["kv_heads"], max_position_embeddings=2048, **_common(s))


def _cfg_qwen2(tf, s, size):
    return tf.Qwen2Config(vocab_size=s["vocab"] if size != "base" else 151936, intermediate_size=s["inter"],
                          num_key_value_heads=s["kv_heads"], max_position_embeddings=2048,
                          use_sliding_window=False, tie_word_embeddings=False, **_common(s))


def _common(s):
    return dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"])


class Layer(NamedTuple):
    """What the simulation and the runtime need of one layer (block_input averaging:
    kv(pre_norm(mean of block input)), then rotated when `rotary`)."""
    index: int
    block: torch.nn.Module
    attention: torch.nn.Module
    pre_norm: Optional[torch.nn.Module]              # None: post-LN, the block input is the attention input
    kv: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]   # attention-input rows -> K, V (unrotated)
    rotary: bool
    # the module whose output is the unrotated keys as rows [B, r, Hkv*d] (None: fused with
    # Q/V, as GPT-2's c_attn); the runtime starts a data-dependent exchange from its output
    key_proj: Optional[torch.nn.Module] = None
    # the query and value projections (Linear, bias included; None where fused): matched
    # rows leave once all three have run, built from their outputs (hf/matched_summary.py;
    # distributed/runtime.py, LayerCtx.projection_ready)
    query_proj: Optional[torch.nn.Module] = None
    value_proj: Optional[torch.nn.Module] = None


@dataclass(frozen=True)
class ModelType:
    model_type: str                  # config.model_type
    kind: str                        # "encoder" | "causal" | "vision"
    model_class: str                 # transformers class built by build_model / loaded by load
    make_config: Callable            # (transformers, sizes dict, size name) -> config
    blocks_path: str                 # model -> ModuleList of blocks
    attention_path: str              # block -> module that calls the attention interface
    pre_norm_path: Optional[str]     # block -> pre-attention norm (None: post-LN)
    kv_fn: Callable                  # (attention module, x) -> (K, V) [B, Hkv, r, d], no rotary
    embed_fn: Callable               # (model, inputs, positions or None) -> [B, n, D]
    run_block_fn: Callable           # (entry, model, block, h, positions) -> h
    final_norm_path: Optional[str]   # model -> final norm (None: none)
    rotary_path: Optional[str] = None  # model -> rotary embedding module (rotary models)
    embed_rows_fn: Optional[Callable] = None  # vision: (model, pixel strip, start, stop, image shape) -> rows
    # vision: the image processor's normalisation of 8-bit pixels, ((mean per channel), (std per channel))
    pixel_norm: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    # attention module -> its key projection (rows [B, r, Hkv*d], bias included); None when
    # the keys come out of a fused projection; likewise its query and value projections
    key_proj_path: Optional[str] = None
    query_proj_path: Optional[str] = None
    value_proj_path: Optional[str] = None

    # ---- building --------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    @property
    def rotary(self) -> bool:
        return self.rotary_path is not None

    @property
    def input_kind(self) -> str:
        """'image' (pixel_values) or 'text' (token ids)."""
        return "image" if self.kind == "vision" else "text"

    def build_config(self, size: str = "tiny"):
        import transformers as tf
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {tuple(SIZES)}")
        cfg = self.make_config(tf, SIZES[size], size)
        if size == "tiny":
            # larger random weights than the HF default (0.02) so attention is far from
            # uniform and segment means visibly change the output (tests need that)
            cfg.initializer_range = 0.3
        return cfg

    def model_cls(self):
        import transformers as tf
        return getattr(tf, self.model_class)

    def build_model(self, size: str = "tiny", seed: int = 0, config=None):
        """A random-weight model; the same seed gives the same weights on every rank."""
        cfg = config if config is not None else self.build_config(size)
        torch.manual_seed(seed)
        model = self.model_cls()(cfg)
        model.eval()
        return model

    def load(self, path: str):
        """A saved model (save_pretrained directory) as this entry's model class."""
        model = self.model_cls().from_pretrained(path)
        model.eval()
        return model

    # ---- structure -------------------------------------------------------------------
    def roles(self, config) -> TokenRoles:
        """Special tokens and patch grid of this model's inputs: encoders [CLS] ... [SEP]
        (RoBERTa <s> ... </s>); decoders their first token (BOS, or whatever token
        starts the sequence: it acts as the attention sink); vision models [CLS] and
        any register tokens, then the patch grid of the configured image size."""
        if self.kind == "encoder":
            return TokenRoles(leading=1, trailing=1)
        if self.kind == "causal":
            return TokenRoles(leading=1)
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        (h, w), (ph, pw) = pair(config.image_size), pair(config.patch_size)
        return TokenRoles(leading=1 + int(getattr(config, "num_register_tokens", 0) or 0),
                          patch_grid=(h // ph, w // pw))

    def blocks(self, model) -> list:
        return list(_get(model, self.blocks_path))

    def attention(self, block):
        return _get(block, self.attention_path)

    def pre_norm(self, block):
        return _get(block, self.pre_norm_path)

    def kv(self, block, x: torch.Tensor, positions: Optional[torch.Tensor] = None, model=None):
        """K, V [B, Hkv, r, d] of attention-input rows x [B, r, D]; rotary models
        rotate the keys at global `positions` [r] (needs `model`)."""
        k, v = self.kv_fn(self.attention(block), x)
        if self.rotary:
            if positions is None or model is None:
                raise ValueError(f"{self.model_type} keys need their global positions and the model (rotary)")
            cos, sin = self.cos_sin(model, positions, x)
            k = apply_rotary(k, cos, sin)
        return k, v

    def layers(self, model) -> List[Layer]:
        out = []
        for i, b in enumerate(self.blocks(model)):
            attn = self.attention(b)
            out.append(Layer(i, b, attn, self.pre_norm(b), lambda x, a=attn: self.kv_fn(a, x), self.rotary,
                             _get(attn, self.key_proj_path), _get(attn, self.query_proj_path),
                             _get(attn, self.value_proj_path)))
        return out

    def cos_sin(self, model, positions: torch.Tensor, like: torch.Tensor):
        """Rotary (cos, sin) [1, r, d] at global positions [r]."""
        return _get(model, self.rotary_path)(like, position_ids=positions.view(1, -1))

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    # ---- input, blocks, output -------------------------------------------------------
    def make_input(self, config, seq_len: Optional[int] = None, seed: int = 0, batch: int = 1,
                   pixels: str = "float"):
        """A random input: token ids of length seq_len, or an image of the model's size:
        normalised float pixel_values, or 8-bit pixels (pixels="uint8", normalised by
        `pixel_values` where the model reads them)."""
        g = torch.Generator().manual_seed(seed + 1)
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
        if self.input_kind == "image":
            size = config.image_size
            if pixels == "uint8":
                return torch.randint(0, 256, (batch, config.num_channels, size, size), generator=g,
                                     dtype=torch.uint8)
            return torch.randn(batch, config.num_channels, size, size, generator=g)
        if pixels != "float":
            raise ValueError(f"pixels={pixels!r} applies to image models, not to {self.model_type} (text)")
        if seq_len is None:
            raise ValueError(f"--seq-len is needed for the {self.model_type} family")
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
        pad = getattr(config, "pad_token_id", None)
        if self.model_type == "roberta" and pad is not None:   # no padding: positions are padding_idx+1+t
            ids = torch.where(ids == pad, (ids + 1) % config.vocab_size, ids)
        return ids

    def pixel_values(self, image: torch.Tensor) -> torch.Tensor:
        """What the model reads: 8-bit pixels rescaled and normalised as the model's image
        processor does (per pixel, so a strip of the image normalises to the same strip);
        float pixel_values as given."""
        if image.dtype != torch.uint8:
            return image
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in self.pixel_norm)
        return (image.to(torch.float32) / 255.0 - mean) / std

    def embed(self, model, inputs: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows of the first block's input [B, n, D]: token ids at global `positions`
        (default 0..n-1), or the whole image (float pixel_values or 8-bit pixels)."""
        if self.input_kind == "image":
            inputs = self.pixel_values(inputs)
        return self.embed_fn(model, inputs, positions)

    def input_slice(self, config, shape, start: int, stop: int) -> Tuple[int, int, int]:
        """(dim, begin, end): the part of a raw input of `shape` a rank needs to embed
        tokens [start, stop) itself: token ids [start, stop) (dim 1) for text; for an
        image the pixel rows (dim 2) of the patch rows its patches lie in (empty for a
        rank holding only [CLS])."""
        if self.input_kind == "text":
            return 1, start, stop
        ph, _, gw, _ = _image_grid(config, shape)
        p0, p1 = max(start, 1) - 1, stop - 1
        if p1 <= p0:
            return 2, 0, 0
        return 2, (p0 // gw) * ph, ((p1 - 1) // gw + 1) * ph

    def embed_slice(self, model, raw: torch.Tensor, start: int, stop: int, shape) -> torch.Tensor:
        """Rows [start, stop) of the first block's input [B, stop - start, D] from the part
        of the raw input `input_slice` names (shape: the whole input's); equal to those rows
        of `embed` on the whole input."""
        if self.input_kind == "text":
            return self.embed(model, raw, torch.arange(start, stop))
        return self.embed_rows_fn(model, self.pixel_values(raw), start, stop, tuple(shape))

    def n_tokens(self, model, inputs: torch.Tensor) -> int:
        if self.input_kind == "image":
            with torch.no_grad():
                return self.embed(model, inputs).shape[1]
        return inputs.shape[1]

    def run_block(self, model, block, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One block on local rows h [B, n, D] at global positions [n]."""
        return self.run_block_fn(self, model, block, h, positions)

    def final_norm(self, model, h: torch.Tensor) -> torch.Tensor:
        norm = _get(model, self.final_norm_path)
        return h if norm is None else norm(h)

    def head(self, model, h: torch.Tensor) -> torch.Tensor:
        """Encoders / vision: the pooled first-token output (the pooler when the model
        has one, else the row); causal: per-token logits of the final-normed rows h."""
        if self.causal:
            return model.lm_head(h)
        pooler = getattr(model, "pooler", None)
        return pooler(h) if pooler is not None else h[:, 0]

    def stock_forward(self, model, inputs: torch.Tensor):
        """The unmodified model: (final-normed hidden states [B, N, D], head output)."""
        with torch.no_grad():
            if self.causal:
                out = model(inputs, output_hidden_states=True)
                return out.hidden_states[-1], out.logits
            out = model(pixel_values=self.pixel_values(inputs)) if self.input_kind == "image" \
                else model(input_ids=inputs)
            return out.last_hidden_state, self.head(model, out.last_hidden_state)


PIXELS = ("float", "uint8")     # make_input: normalised float pixel_values, or 8-bit pixels


def _entry(model_type, kind, model_class, make_config, blocks, attention, pre_norm, kv, embed, run, final,
           rotary=None, embed_rows=None, pixel_norm=None, key_proj=None):
    # separate q / k / v Linears are named query / key / value (BERT) or q_proj / k_proj / v_proj
    q_proj, v_proj = {"key": ("query", "value"), "k_proj": ("q_proj", "v_proj")}.get(key_proj, (None, None))
    return ModelType(model_type, kind, model_class, make_config, blocks, attention, pre_norm, kv, embed, run,
                     final, rotary, embed_rows, pixel_norm, key_proj, q_proj, v_proj)


# The image processors' normalisation (rescale by 1/255, then (x - mean) / std): ViTImageProcessor's
# defaults, and ImageNet's statistics for DINOv2 (BitImageProcessor of facebook/dinov2-*)
_VIT_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


TABLE: Dict[str, ModelType] = {e.model_type: e for e in (
    _entry("bert", "encoder", "BertModel", _cfg_bert, "encoder.layer", "attention.self", None,
           _kv_bert, _embed_bert, _run_plain, None, key_proj="key"),
    _entry("roberta", "encoder", "RobertaModel", _cfg_roberta, "encoder.layer", "attention.self", None,
           _kv_bert, _embed_roberta, _run_plain, None, key_proj="key"),
    _entry("vit", "vision", "ViTModel", _cfg_vit, "layers", "attention", "layernorm_before",
           _kv_proj, _embed_image, _run_plain, "layernorm", embed_rows=_image_rows(_positions_vit),
           pixel_norm=_VIT_NORM, key_proj="k_proj"),
    _entry("dinov2", "vision", "Dinov2Model", _cfg_dinov2, "encoder.layer", "attention", "norm1",
           _kv_proj, _embed_image, _run_plain, "layernorm", embed_rows=_image_rows(_positions_dinov2),
           pixel_norm=_IMAGENET_NORM, key_proj="k_proj"),
    _entry("gpt2", "causal", "GPT2LMHeadModel", _cfg_gpt2, "transformer.h", "attn", "ln_1",
           _kv_gpt2, _embed_gpt2, _run_gpt2, "transformer.ln_f"),
    _entry("llama", "causal", "LlamaForCausalLM", _cfg_llama, "model.layers", "self_attn", "input_layernorm",
           _kv_proj, _embed_decoder, _run_rotary, "model.norm", rotary="model.rotary_emb",
           key_proj="k_proj"),
    _entry("qwen2", "causal", "Qwen2ForCausalLM", _cfg_qwen2, "model.layers", "self_attn", "input_layernorm",
           _kv_proj, _embed_decoder, _run_rotary, "model.norm", rotary="model.rotary_emb",
           key_proj="k_proj"),
)}
MODEL_TYPES = tuple(TABLE)


def lookup(model_or_config) -> ModelType:
    """The entry of a model (its .config), a config, or a model-type name, by config.model_type."""
    if isinstance(model_or_config, str):
        mt = model_or_config
    else:
        cfg = getattr(model_or_config, "config", model_or_config)
        mt = getattr(cfg, "model_type", None)
    if mt not in TABLE:
        raise ValueError(f"unsupported model type {mt!r} ({type(model_or_config).__name__}); "
                         f"supported model types: {', '.join(MODEL_TYPES)}")
    return TABLE[mt]


def build_config(model_type: str, size: str = "tiny"):
    return lookup(model_type).build_config(size)


def build_model(model_type: str, size: str = "tiny", seed: int = 0, config=None):
    return lookup(model_type).build_model(size, seed, config)


def token_roles(model_or_config) -> TokenRoles:
    """Where the model's special tokens and patch grid are; a model type outside the
    table (enable_prism's allow_untested) is treated as text whose first token is its
    only special token."""
    cfg = getattr(model_or_config, "config", model_or_config)
    entry = TABLE.get(getattr(cfg, "model_type", None))
    return entry.roles(cfg) if entry is not None else TEXT

"""How to run one Hugging Face model family block by block on a partition.

An adapter knows, for one family:
  * how the master builds the input and embeds it (all N rows, positions included);
  * the list of blocks (each called on the local rows only, with attention routed
    through the "prism_distributed" attention function, see overlap.py);
  * the block's pre-attention norm and its K/V projections, so that a device can
    turn received hidden rows (segment means, or full rows in Voltage mode) into
    keys and values without running the query or output projections on them;
  * the final norm and the head.

Families: bert (BertModel), vit (ViTModel), dinov2 (Dinov2Model), gpt2 (GPT2LMHeadModel),
llama (LlamaForCausalLM). Random-weight configurations come from `build_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

FAMILIES = ("bert", "vit", "dinov2", "gpt2", "llama")

# Sizes. "tiny" for tests; "base" matches ViT-B/16, BERT-base, GPT-2 small.
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, inter=64, vocab=97, image=32, patch=8),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, inter=512, vocab=1000, image=64, patch=16),
    "base": dict(hidden=768, layers=12, heads=12, kv_heads=4, inter=3072, vocab=30522, image=224, patch=16),
}


def build_config(family: str, size: str = "tiny"):
    import transformers as tf
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {tuple(SIZES)}")
    s = SIZES[size]
    common = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"])
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=s["vocab"], intermediate_size=s["inter"], max_position_embeddings=512,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif family == "vit":
        cfg = tf.ViTConfig(image_size=s["image"], patch_size=s["patch"], intermediate_size=s["inter"],
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif family == "dinov2":
        cfg = tf.Dinov2Config(image_size=s["image"], patch_size=s["patch"], mlp_ratio=4,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=s["vocab"] if size != "base" else 50257, n_positions=1024,
                            n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        cfg = tf.LlamaConfig(vocab_size=s["vocab"] if size != "base" else 32000, intermediate_size=s["inter"],
                             num_key_value_heads=s["kv_heads"], max_position_embeddings=2048, **common)
    if size == "tiny":
        # larger random weights than the HF default (0.02) so attention is far from
        # uniform and segment means visibly change the output (tests need that)
        cfg.initializer_range = 0.3
    return cfg


def build_model(family: str, size: str = "tiny", seed: int = 0, config=None):
    """A random-weight model of `family`; the same seed gives the same weights on every rank."""
    import transformers as tf
    cfg = config if config is not None else build_config(family, size)
    torch.manual_seed(seed)
    cls = {"bert": tf.BertModel, "vit": tf.ViTModel, "dinov2": tf.Dinov2Model,
           "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[family]
    model = cls(cfg)
    model.eval()
    return model


def family_of(model) -> str:
    name = type(model).__name__
    for fam, prefix in (("bert", "Bert"), ("vit", "ViT"), ("dinov2", "Dinov2"), ("gpt2", "GPT2"),
                        ("llama", "Llama")):
        if name.startswith(prefix):
            return fam
    raise ValueError(f"unsupported model class {name}; supported families: {FAMILIES}")


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, n, _ = x.shape
    return x.view(B, n, -1, head_dim).transpose(1, 2)


@dataclass
class Adapter:
    family: str
    model: torch.nn.Module
    causal: bool
    rotary: bool

    # ---- structure ------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    def blocks(self):
        m = self.model
        if self.family == "bert":
            return list(m.encoder.layer)
        if self.family == "vit":
            return list(m.layers)
        if self.family == "dinov2":
            return list(m.encoder.layer)
        if self.family == "gpt2":
            return list(m.transformer.h)
        return list(m.model.layers)

    # ---- master: input and embeddings -------------------------------------------------
    def make_input(self, seq_len: Optional[int], seed: int = 0, batch: int = 1):
        """A random input: token ids of length seq_len, or an image of the model's size."""
        g = torch.Generator().manual_seed(seed + 1)
        if self.family in ("vit", "dinov2"):
            size = self.config.image_size
            return torch.randn(batch, self.config.num_channels, size, size, generator=g)
        if seq_len is None:
            raise ValueError(f"--seq-len is needed for the {self.family} family")
        return torch.randint(0, self.config.vocab_size, (batch, seq_len), generator=g)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """All N rows of the first block's input, [B, N, D] (master only)."""
        m = self.model
        if self.family == "bert":
            return m.embeddings(input_ids=inputs)
        if self.family == "vit":
            return m.embeddings(inputs)
        if self.family == "dinov2":
            return m.embeddings(inputs)
        if self.family == "gpt2":
            t = m.transformer
            pos = torch.arange(inputs.shape[1]).unsqueeze(0)
            return t.drop(t.wte(inputs) + t.wpe(pos))
        return m.model.embed_tokens(inputs)

    # ---- device: one block on the local rows ---------------------------------------------
    def rotary_embed(self, h: torch.Tensor, positions: torch.Tensor):
        return self.model.model.rotary_emb(h, position_ids=positions.unsqueeze(0))

    def run_block(self, block, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One block on local rows h [B, n, D] at global `positions` [n]."""
        if self.family == "llama":
            pe = self.rotary_embed(h, positions)
            return block(h, attention_mask=None, position_ids=positions.unsqueeze(0), position_embeddings=pe)
        if self.family == "gpt2":
            return block(h, attention_mask=None)
        return block(h, None)

    def pre_norm(self, block) -> Callable[[torch.Tensor], torch.Tensor]:
        """The norm a block applies before attention (identity for post-LN BERT)."""
        if self.family == "bert":
            return lambda x: x
        if self.family == "vit":
            return block.layernorm_before
        if self.family == "dinov2":
            return block.norm1
        if self.family == "gpt2":
            return block.ln_1
        return block.input_layernorm

    def attention_module(self, block):
        return {"bert": lambda b: b.attention.self, "vit": lambda b: b.attention,
                "dinov2": lambda b: b.attention, "gpt2": lambda b: b.attn,
                "llama": lambda b: b.self_attn}[self.family](block)

    def kv_from_attn_input(self, block, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """K, V [B, Hkv, r, d] of rows x [B, r, D] that are already the attention input
        (after the pre-norm). Llama needs their global positions for the rotary."""
        a = self.attention_module(block)
        hd = self.head_dim
        if self.family == "bert":
            return _heads(a.key(x), hd), _heads(a.value(x), hd)
        if self.family in ("vit", "dinov2"):
            return _heads(a.k_proj(x), hd), _heads(a.v_proj(x), hd)
        if self.family == "gpt2":
            D = self.hidden_size
            w, b = a.c_attn.weight, a.c_attn.bias          # Conv1D: x @ w + b, w [D, 3D]
            kv = torch.addmm(b[D:], x.reshape(-1, D), w[:, D:]).view(*x.shape[:-1], 2 * D)
            k, v = kv.split(D, dim=-1)
            return _heads(k, hd), _heads(v, hd)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        if positions is None:
            raise ValueError("llama keys need global positions (rotary)")
        k, v = _heads(a.k_proj(x), hd), _heads(a.v_proj(x), hd)
        cos, sin = self.rotary_embed(x, positions)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def kv_from_block_input(self, block, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """K, V of rows x given as block input (pre-norm applied here)."""
        return self.kv_from_attn_input(block, self.pre_norm(block)(x), positions)

    # ---- after the last block ------------------------------------------------------------
    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.family == "bert":
            return h
        if self.family in ("vit", "dinov2"):
            return m.layernorm(h)
        if self.family == "gpt2":
            return m.transformer.ln_f(h)
        return m.model.norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """What the model returns from the final-normed rows the head needs:
        encoders: the pooled [CLS] output (pooler if the model has one, else the row);
        causal LMs: per-token logits."""
        m = self.model
        if self.causal:
            return m.lm_head(h)
        pooler = getattr(m, "pooler", None)
        return pooler(h) if pooler is not None else h[:, 0]

    def stock_forward(self, inputs: torch.Tensor):
        """The unmodified model, for single-device mode and the tests:
        (final-normed hidden states [B, N, D], head output)."""
        m = self.model
        with torch.no_grad():
            if self.causal:
                out = m(inputs, output_hidden_states=True)
                return out.hidden_states[-1], out.logits
            if self.family == "bert":
                out = m(input_ids=inputs)
            else:
                out = m(pixel_values=inputs)
            return out.last_hidden_state, (out.pooler_output if self.family != "dinov2"
                                           else out.last_hidden_state[:, 0])


def make_adapter(model) -> Adapter:
    fam = family_of(model)
    return Adapter(fam, model, causal=fam in ("gpt2", "llama"), rotary=fam == "llama")

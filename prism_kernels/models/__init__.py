"""The table of supported Hugging Face model types (see table.py)."""
from .table import (MODEL_TYPES, SIZES, TABLE, Layer, ModelType, apply_rotary, build_config,
                    build_model, lookup, rotate_half, token_roles)

__all__ = ["MODEL_TYPES", "SIZES", "TABLE", "Layer", "ModelType", "apply_rotary", "build_config",
           "build_model", "lookup", "rotate_half", "token_roles"]

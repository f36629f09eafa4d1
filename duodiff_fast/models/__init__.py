"""Model layer: U-ViT and DiT with official parameter names, named presets, checkpoint loading, and the
early-exit heads that compose them."""
from .checkpoint import load_checkpoint, save_safetensors
from .configs import PRESETS, create_model, list_presets
from .dit import DiT
from .exits import EarlyExitModel
from .uvit import UViT

__all__ = ["UViT", "DiT", "EarlyExitModel", "create_model", "load_checkpoint", "save_safetensors", "PRESETS",
           "list_presets"]

"""Load official (or our own) checkpoints into a preset; save as safetensors.

Accepted files: `.pth` / `.pt` / `.bin` (read with `torch.load(weights_only=True)`, so no code runs)
holding a bare state_dict (official U-ViT `nnet_ema.pth`, DiT `DiT-XL-2-256x256.pt`) or a wrapper
such as {'ema': sd}, {'model': sd}, {'state_dict': sd} (DiT training checkpoints: 'ema' wins, as in
its sample.py); and `.safetensors`. 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes are
stripped.
"""
import argparse
import os

import torch
import torch.nn as nn

from .configs import create_model

# Wrapper keys, in order of preference: EMA weights are the ones to sample with.
_WRAPPER_KEYS = ("ema", "model_ema", "state_dict_ema", "model", "state_dict", "nnet_ema", "nnet", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per category in an error


def _read(path, map_location):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path), device=str(map_location) if map_location is not None else "cpu")
    # DiT training checkpoints also pickle their argparse.Namespace ('args'): allow just that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _is_state_dict(d):
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def unwrap_state_dict(obj):
    """The tensor dict inside a loaded checkpoint (bare, or under a common wrapper key)."""
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict):
        key = next((k for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:
            raise ValueError(f"no state_dict found in checkpoint: top-level keys {list(obj)[:10]}, "
                             f"expected tensors or one of {_WRAPPER_KEYS}")
        sd = obj[key]
    else:
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_state_dict(model: nn.Module, sd: dict, name: str = "model", strict: bool = True):
    """Raise ValueError naming the first few missing, unexpected and wrongly shaped keys.
    Shape mismatches always raise; missing/unexpected keys only when strict."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not shapes and not (strict and (missing or unexpected)):
        return

    def listing(what, items):
        more = " ..." if len(items) > _SHOW else ""
        return f"  {len(items)} {what}: " + ", ".join(items[:_SHOW]) + more

    lines = [f"checkpoint does not match preset {name!r}:"]
    if strict and missing:
        lines.append(listing("missing keys", missing))
    if strict and unexpected:
        lines.append(listing("unexpected keys", unexpected))
    if shapes:
        lines.append(listing("wrongly shaped keys",
                             [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in shapes]))
    raise ValueError("\n".join(lines))


def load_checkpoint(path, preset, map_location="cpu", strict=True) -> nn.Module:
    """Build `preset` (a name, a preset dict, or an existing nn.Module to fill) and load `path` into it.
    Returns the model in eval mode (DiT drops labels at random in train mode)."""
    sd = unwrap_state_dict(_read(path, map_location))
    if isinstance(preset, nn.Module):
        model, name = preset, type(preset).__name__
    else:
        model = create_model(preset)
        name = preset if isinstance(preset, str) else preset.get("description", "custom preset")
    check_state_dict(model, sd, name, strict)
    model.load_state_dict(sd, strict=strict)
    return model.eval()


def save_safetensors(model: nn.Module, path, metadata=None):
    """Write the model's state_dict (contiguous CPU copies) to a .safetensors file; metadata values are
    stored as strings."""
    from safetensors.torch import save_file
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_file(sd, str(path), metadata=meta)

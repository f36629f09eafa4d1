"""Load official (or our own) checkpoints into a preset; save as safetensors.

Accepted inputs:
- `.pth` / `.pt` / `.bin` (read with `torch.load(weights_only=True)`, so no code runs) holding a bare
  state_dict (official U-ViT `nnet_ema.pth`, DiT `DiT-XL-2-256x256.pt`) or a wrapper such as
  {'ema': sd}, {'model': sd}, {'state_dict': sd} (DiT training checkpoints: 'ema' wins, as in its
  sample.py). 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes are stripped.
- `.safetensors`.
- a local diffusers model folder of a DiT transformer (`config.json` + `diffusion_pytorch_model.safetensors`,
  sharded or not), or a DiTPipeline folder holding one under `transformer/` (see `diffusers_io`).

The format is told by content (zip/pickle magic or a safetensors header), not by the name alone: a file
whose content contradicts its extension, an empty, truncated or unrecognised file, a directory that is no
diffusers model folder, a pickle that needs code to load, a file without tensors and non-floating
weights for floating parameters all raise one `CheckpointError` (a ValueError) naming the path and
what was expected. Reading never writes to the file.
"""
import argparse
import os

import torch
from torch import nn

from .configs import create_model

# Wrapper keys, in order of preference: EMA weights are the ones to sample with.
_WRAPPER_KEYS = ("ema", "model_ema", "state_dict_ema", "model", "state_dict", "nnet_ema", "nnet", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per category in an error

EXPECTED = ("a PyTorch checkpoint (.pt/.pth/.bin written by torch.save), a .safetensors file, or a "
            "diffusers model folder (config.json + diffusion_pytorch_model.safetensors)")
_TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_SAFETENSORS_EXTS = (".safetensors",)


class CheckpointError(ValueError):
    """A checkpoint path that cannot be read, or whose content does not fit the model."""


# -----------------------------------------------------------------------------
# Reading files
# -----------------------------------------------------------------------------

def sniff_format(path) -> str:
    """What a file holds, from its first bytes: 'zip' (torch.save since 1.6), 'pickle' (legacy torch.save
    or a plain pickle), 'safetensors', 'safetensors-truncated' (a safetensors header longer than the
    file), 'empty' or 'unknown'."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        return "safetensors" if 8 + header_len <= size else "safetensors-truncated"
    return "unknown"


_DESCRIBE = {"zip": "a torch.save zip archive", "pickle": "a pickle (legacy torch.save)",
             "safetensors": "a safetensors file", "unknown": "neither a torch checkpoint nor safetensors"}


def _fail(path, problem):
    return CheckpointError(f"cannot load checkpoint {os.fspath(path)}: {problem}; expected {EXPECTED}")


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _read_torch(path, map_location):
    import pickle
    try:
        # DiT training checkpoints also pickle their argparse.Namespace ('args'): allow just that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        marker = "Unsupported global: GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            raise _fail(path, f"unpickling needs the global `{name}`, which a weights-only load refuses to "
                              "import (the file is truncated or corrupt, or holds objects other than tensors "
                              "and plain containers; re-save just its state_dict)") from e
        raise _fail(path, f"it is not a readable torch checkpoint ({_short(e)})") from e
    except (MemoryError, KeyboardInterrupt):
        raise
    except PermissionError:
        raise
    except Exception as e:
        if sniff_format(path) == "zip" and _zip_is_foreign(path):
            raise _fail(path, "it is a zip archive without torch.save's data.pkl (an .npz or another "
                              f"archive?) ({_short(e)})") from e
        raise _fail(path, f"it is truncated or corrupt ({_short(e)})") from e


def _zip_is_foreign(path) -> bool:
    """A complete zip archive that holds no torch.save record (<name>/data.pkl)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # truncated or damaged: say so instead
    return not any(n.endswith("data.pkl") for n in names)


def _read_safetensors(path, map_location):
    from safetensors.torch import load_file
    try:
        return load_file(os.fspath(path), device=str(map_location) if map_location is not None else "cpu")
    except (MemoryError, KeyboardInterrupt):
        raise
    except PermissionError:
        raise
    except Exception as e:
        raise _fail(path, f"this safetensors file is truncated or corrupt ({_short(e)})") from e


def _read(path, map_location):
    """The raw object stored at `path` (a dict of tensors for safetensors, whatever torch.save stored
    otherwise). Raises FileNotFoundError for a missing path and CheckpointError for everything else
    that is not a readable checkpoint file (directories included: see `read_state_dict` for folders)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (expected {EXPECTED})")
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") if entries else "nothing"
        hint = "; a training run folder? pass its ema.safetensors" if "ema.safetensors" in entries else ""
        raise _fail(path, f"it is a directory holding {shown}, not a diffusers model folder "
                          f"(no config.json with a diffusers _class_name){hint}")
    kind = sniff_format(path)
    ext = os.path.splitext(path)[1].lower()
    if kind == "empty":
        raise _fail(path, "the file is empty (0 bytes)")
    if kind == "safetensors-truncated":
        raise _fail(path, f"its safetensors header runs past the end of the file "
                          f"({os.path.getsize(path)} bytes): the file is truncated")
    if kind == "unknown":
        raise _fail(path, "its content is neither a torch checkpoint (zip or pickle) nor a safetensors "
                          "file")
    if ext in _SAFETENSORS_EXTS and kind != "safetensors":
        raise _fail(path, f"the name says .safetensors but the file is {_DESCRIBE[kind]}; rename it to .pt")
    if ext in _TORCH_EXTS and kind == "safetensors":
        raise _fail(path, f"the name says {ext} (torch.save) but the file is a safetensors file; rename it "
                          "to .safetensors")
    if kind == "safetensors":
        return _read_safetensors(path, map_location)
    return _read_torch(path, map_location)


def _is_state_dict(d):
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def unwrap_state_dict(obj, source=None):
    """The tensor dict inside a loaded checkpoint (bare, or under a common wrapper key). `source` (the
    path) is named in the error when there is none."""
    where = f" in {os.fspath(source)}" if source is not None else ""
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict) and not obj:
        sd = {}
    elif isinstance(obj, dict):
        key = next((k for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:
            keys = [str(k) for k in list(obj)[:10]]
            raise CheckpointError(f"no state_dict found{where}: it holds a dict with top-level keys {keys}; "
                                  f"expected a dict of tensors or one under one of {_WRAPPER_KEYS}")
        sd = obj[key]
    else:
        raise CheckpointError(f"no state_dict found{where}: it holds a {type(obj).__name__}, expected a dict "
                              "of tensors")
    if not sd:
        raise CheckpointError(f"no state_dict found{where}: it holds no tensors (an empty dict); expected a "
                              "dict of tensors")
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path, map_location="cpu", model: nn.Module = None) -> dict:
    """The state dict stored at `path` in our parameter names: a checkpoint file, or a diffusers model
    folder mapped onto our DiT's keys (`model`, when given, must be the DiT it is for; its config is
    checked against the folder's)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from . import diffusers_io
        folder = diffusers_io.find_model_folder(path)
        if folder is not None:
            return diffusers_io.read_dit_state_dict(folder, map_location=map_location, model=model)
    return unwrap_state_dict(_read(path, map_location), source=path)


# -----------------------------------------------------------------------------
# Checking and loading
# -----------------------------------------------------------------------------

def check_state_dict(model: nn.Module, sd: dict, name: str = "model", strict: bool = True, source=None):
    """Raise CheckpointError naming the first few missing, unexpected, wrongly shaped and wrongly typed
    keys. Shape mismatches and non-floating tensors for floating parameters always raise;
    missing/unexpected keys only when strict. `source` (the path) is named in the message."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    dtypes = [(k, sd[k].dtype, own[k].dtype) for k in own
              if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if not shapes and not dtypes and not (strict and (missing or unexpected)):
        return

    def listing(what, items):
        more = " ..." if len(items) > _SHOW else ""
        return f"  {len(items)} {what}: " + ", ".join(items[:_SHOW]) + more

    where = f" {os.fspath(source)}" if source is not None else ""
    lines = [f"checkpoint{where} does not match preset {name!r}:"]
    if strict and missing:
        lines.append(listing("missing keys", missing))
    if strict and unexpected:
        lines.append(listing("unexpected keys", unexpected))
    if shapes:
        lines.append(listing("wrongly shaped keys",
                             [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in shapes]))
    if dtypes:
        lines.append(listing("non-floating tensors for floating parameters (expected float16/bfloat16/"
                             "float32/float64 weights)",
                             [f"{k} (checkpoint {a} vs model {b})" for k, a, b in dtypes]))
    raise CheckpointError("\n".join(lines))


def _build(preset):
    if isinstance(preset, nn.Module):
        return preset, type(preset).__name__
    model = create_model(preset)
    return model, preset if isinstance(preset, str) else preset.get("description", "custom preset")


def load_checkpoint(path, preset, map_location="cpu", strict=True) -> nn.Module:
    """Build `preset` (a name, a preset dict, or an existing nn.Module to fill) and load `path` into it:
    a checkpoint file or a diffusers DiT model folder (whose config is checked against the preset, and
    whose numerics the model then follows, see `diffusers_io.load_diffusers_dit`).
    Returns the model in eval mode (DiT drops labels at random in train mode)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from . import diffusers_io
        folder = diffusers_io.find_model_folder(path)
        if folder is not None:
            return diffusers_io.load_diffusers_dit(folder, preset, map_location=map_location, strict=strict)
    obj = _read(path, map_location)
    sd = unwrap_state_dict(obj, source=path)
    model, name = _build(preset)
    check_state_dict(model, sd, name, strict, source=path)
    model.load_state_dict(sd, strict=strict)
    meta = _safetensors_metadata(path) if sniff_format(path) == "safetensors" else {}
    if meta.get("time_freq_shift") or meta.get("mlp_norm_eps"):
        from . import diffusers_io
        diffusers_io.apply_numerics(model, meta)
    if "cfg_channels" in meta:
        model.cfg_channels = None if meta["cfg_channels"] == "all" else int(meta["cfg_channels"])
    return model.eval()


def _safetensors_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(os.fspath(path), "pt") as f:
        return dict(f.metadata() or {})


def save_safetensors(model: nn.Module, path, metadata=None):
    """Write the model's state_dict (contiguous CPU copies) to a .safetensors file; metadata values are
    stored as strings. A DiT that follows diffusers' numerics (loaded from a diffusers folder) records
    them and its guided channels in the metadata, so `load_checkpoint` restores the same sampler."""
    from safetensors.torch import save_file
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    numerics = getattr(model, "numerics", None)
    if numerics:  # a DiT in diffusers' conventions (loaded from a diffusers folder)
        meta.setdefault("time_freq_shift", str(numerics["time_freq_shift"]))
        meta.setdefault("mlp_norm_eps", repr(float(numerics["mlp_norm_eps"])))
        cfg_channels = getattr(model, "cfg_channels", None)
        meta.setdefault("cfg_channels", "all" if cfg_channels is None else str(cfg_channels))
    path = os.fspath(path)
    # A temporary name in the same folder, then a rename: an interrupted save never leaves a half file
    # under the name a user (or a resumed run) relies on.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Latents to images with a local diffusers `AutoencoderKL` folder (diffusers optional, nothing downloaded).

Latent presets (DiT, U-ViT ImageNet latent models) sample the SD KL-f8 VAE's latents scaled by the
preset's `latent_scale` (0.18215); decoding divides by it and runs the VAE decoder, in batches, on the
sampling device, then maps [-1, 1] to uint8 as the rest of the package does (`data.to_uint8`).

    duodiff-fast sample ... --vae /models/sd-vae-ft-ema          # the lead's CLI wiring calls decode_and_save
    from duodiff_fast.vae import load_vae, decode_latents
    images = decode_latents(load_vae("/models/sd-vae-ft-ema", "cuda"), latents, latent_scale=0.18215)

The folder is what `AutoencoderKL.save_pretrained` writes (config.json + diffusion_pytorch_model.safetensors),
e.g. a downloaded `stabilityai/sd-vae-ft-ema`; it is opened with `local_files_only=True`.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

__all__ = ["VAE_EXPECTED", "check_vae_folder", "decode_and_save", "decode_latents", "load_vae"]

VAE_EXPECTED = "a local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _import_autoencoder():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("decoding latents with --vae needs diffusers (pip install diffusers); without it the "
                          "latents are saved as they are") from e
    return AutoencoderKL


def check_vae_folder(path, latent_channels: int | None = None) -> dict:
    """Check, before any sampling, that `path` is an AutoencoderKL folder diffusers can open, with
    `latent_channels` latent channels when given. Returns its config."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vae {path}: not found; expected {VAE_EXPECTED}")
    cfg_path = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "vae")) and not os.path.isfile(cfg_path):
        raise ValueError(f"--vae {path}: a pipeline folder? pass its vae/ subfolder ({os.path.join(path, 'vae')})")
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        raise ValueError(f"--vae {path}: expected {VAE_EXPECTED}, found no config.json there")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"--vae {path}: config.json is not valid JSON ({e}); expected {VAE_EXPECTED}") from e
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if name != "AutoencoderKL":
        raise ValueError(f"--vae {path}: config.json describes _class_name={name!r}; expected {VAE_EXPECTED}")
    if latent_channels is not None and cfg.get("latent_channels", 4) != latent_channels:
        raise ValueError(f"--vae {path}: the VAE has latent_channels={cfg.get('latent_channels', 4)}, the model "
                         f"samples {latent_channels}-channel latents")
    if cfg.get("shift_factor"):
        raise ValueError(f"--vae {path}: the VAE has shift_factor={cfg['shift_factor']} (an SD3/Flux-style VAE); "
                         "the presets' latents are only scaled (SD KL-f8 VAE)")
    _import_autoencoder()
    return cfg


def load_vae(path, device="cpu", dtype=torch.float32):
    """AutoencoderKL from a local folder, in eval mode on `device`. dtype float32 by default (the SD VAE
    overflows in float16 on some images; diffusers upcasts it for the same reason)."""
    check_vae_folder(path)
    AutoencoderKL = _import_autoencoder()
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    # torch_dtype at load time (not .to(dtype) after) is how diffusers wants a VAE cast; low_cpu_mem_usage
    # off: it needs `accelerate`, which is optional.
    vae = AutoencoderKL.from_pretrained(os.fspath(path), local_files_only=True, torch_dtype=dtype,
                                        low_cpu_mem_usage=False)
    return vae.to(device=device).eval()


def _scale_check(vae, latent_scale):
    if latent_scale is None or not float(latent_scale) > 0:
        raise ValueError(f"latent_scale must be a positive number (the preset's latent_scale), got {latent_scale!r}")
    vae_scale = getattr(getattr(vae, "config", None), "scaling_factor", None)
    if vae_scale is not None and abs(float(vae_scale) - float(latent_scale)) > 1e-6 * float(latent_scale):
        warnings.warn(f"the VAE's config has scaling_factor={vae_scale}, the model's preset latent_scale="
                      f"{latent_scale}; decoding with the preset's (the scale the model was trained on)",
                      stacklevel=3)


@torch.inference_mode()
def decode_latents(vae, latents, *, latent_scale: float, batch_size: int = 8, device=None, dtype=None,
                   progress: bool = False, on_batch=None) -> np.ndarray:
    """Decode model-space latents [N, C, h, w] (tensor or array) into uint8 images [N, H, W, 3].

    Batches of `batch_size` run on `device` (default: the VAE's) in `dtype` (default: the VAE's);
    `on_batch(start, uint8_batch)` is called after each batch (to write PNGs as they come)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _scale_check(vae, latent_scale)
    from .data import to_uint8
    z_all = torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents)
    if z_all.dim() != 4 or not z_all.is_floating_point():
        raise ValueError(f"latents must be a float [N, C, h, w] array, got {tuple(z_all.shape)} {z_all.dtype}")
    want_c = getattr(getattr(vae, "config", None), "latent_channels", z_all.shape[1])
    if z_all.shape[1] != want_c:
        raise ValueError(f"latents have {z_all.shape[1]} channels, the VAE expects {want_c}")
    p = next(vae.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or p.dtype
    n = z_all.shape[0]
    out = None
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="decoding", unit="batch", leave=False)
    for s in starts:
        z = z_all[s:s + batch_size].to(device=device, dtype=dtype) / float(latent_scale)
        img = vae.decode(z).sample  # [b, 3, H, W] in about [-1, 1]
        u8 = to_uint8(img.float())
        if out is None:
            out = np.empty((n,) + u8.shape[1:], np.uint8)
        out[s:s + len(u8)] = u8
        if on_batch is not None:
            on_batch(s, u8)
    if out is None:
        raise ValueError("no latents to decode (N = 0)")
    return out


def _savez_atomic(path, **arrays):
    from . import _io
    _io.savez(path, **arrays)


def decode_and_save(out_dir, vae, *, latent_scale: float, device=None, batch_size: int = 16, dtype="fp32",
                    pngs: bool = True, grid_n: int = 64, progress: bool = True) -> dict:
    """Turn the latents of `out_dir/samples.npz` (what `duodiff-fast sample` writes for latent models)
    into images: `samples.npz` then holds `arr_0` (uint8 [N, H, W, 3]) and `labels`, as for pixel models
    (what `duodiff-fast eval` reads); the latents move to `latents.npz`; `images/000000.png ...` (global
    sample index) and `grid.png` (first `grid_n`) are written. `vae` is a folder path or an AutoencoderKL.

    Files are written under temporary names and renamed, latents.npz first and samples.npz last: if
    decoding fails, samples.npz still holds the latents. Returns dict(samples, latents, images, grid, n)."""
    from .data import save_grid
    out_dir = os.fspath(out_dir)
    npz = os.path.join(out_dir, "samples.npz")
    if not os.path.isfile(npz):
        raise FileNotFoundError(f"decode: no samples.npz in {out_dir} (expected the output of duodiff-fast sample)")
    with np.load(npz, allow_pickle=False) as z:
        if "latents" not in z.files:
            raise ValueError(f"decode: {npz} holds {z.files}, expected 'latents' (already decoded, or a pixel model)")
        latents = z["latents"]
        labels = z["labels"] if "labels" in z.files else None
    if isinstance(vae, (str, os.PathLike)):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        vae = load_vae(vae, device=device, dtype=dtype)
    elif isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    extra = {"labels": labels} if labels is not None else {}
    _savez_atomic(os.path.join(out_dir, "latents.npz"), latents=latents, **extra)
    img_dir = os.path.join(out_dir, "images")

    def write_pngs(start, u8):
        from PIL import Image
        os.makedirs(img_dir, exist_ok=True)
        from . import _io
        for i, im in enumerate(u8):
            with _io.atomic_path(os.path.join(img_dir, f"{start + i:06d}.png")) as tmp:
                Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).save(tmp)

    images = decode_latents(vae, latents, latent_scale=latent_scale, batch_size=batch_size, device=device,
                            dtype=dtype if not isinstance(dtype, str) else _DTYPES[dtype], progress=progress,
                            on_batch=write_pngs if pngs else None)
    grid = os.path.join(out_dir, "grid.png")
    first = torch.from_numpy(images[:grid_n]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    from . import _io
    with _io.atomic_path(grid) as tmp:
        save_grid(first, tmp)
    _savez_atomic(npz, arr_0=images, **extra)
    return dict(samples=npz, latents=os.path.join(out_dir, "latents.npz"), images=img_dir if pngs else None,
                grid=grid, n=int(images.shape[0]))

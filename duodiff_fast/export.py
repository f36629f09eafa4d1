"""`duodiff-fast export`: write a model as a diffusers DiTTransformer2DModel folder or as our safetensors.

    duodiff-fast export --format diffusers --model dit_s_2_shallow --ckpt runs/shallow/ema.safetensors \\
        --out exported/shallow_transformer
    duodiff-fast export --format safetensors --ckpt DiT-XL-2-256/transformer --out dit_xl_2.safetensors

`--ckpt` is anything `load_checkpoint` reads (a .pt/.pth/.safetensors file, or a diffusers folder); `--model`
a preset name or a JSON spec (`model.json` of a training run), optional for diffusers folders. The
diffusers folder loads with `DiTTransformer2DModel.from_pretrained(OUT)` and plugs into `DiTPipeline`;
the safetensors file keeps the model's numerics in its metadata. Outputs are written under temporary
names and renamed; an existing output is replaced only with --overwrite.
"""
from __future__ import annotations

import os

__all__ = ["add_cli", "cmd_export", "load_for_export"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _spec(text):
    from .models.configs import load_spec
    return load_spec(text)


def load_for_export(ckpt, model=None):
    """The model at `ckpt` (file or diffusers folder) built from `model` (preset name / JSON spec / None for
    diffusers folders), in eval mode on the CPU."""
    from .models import load_checkpoint
    from .models.diffusers_io import find_model_folder, load_diffusers_dit
    folder = find_model_folder(ckpt)
    if folder is not None:
        return load_diffusers_dit(folder, None if model is None else _spec(model))
    if model is None:
        raise ValueError(f"--ckpt {ckpt} is a checkpoint file: pass --model (a preset name or a JSON spec); "
                         "only diffusers folders describe their own architecture")
    return load_checkpoint(ckpt, _spec(model))


def cmd_export(args):
    import torch

    from .models import save_safetensors
    from .models.diffusers_io import export_diffusers
    out = os.path.abspath(args.out)
    empty_folder = os.path.isdir(out) and not os.listdir(out)
    if os.path.exists(out) and not args.overwrite and not empty_folder:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    if args.format == "safetensors" and os.path.isdir(out):
        raise IsADirectoryError(f"--out {out} is a folder; --format safetensors writes one file (e.g. model.safetensors)")
    model = load_for_export(args.ckpt, args.model)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    if args.format == "diffusers":
        path = export_diffusers(model, out, overwrite=args.overwrite, dtype=dtype)
        print(f"wrote {path} (DiTTransformer2DModel: config.json + diffusion_pytorch_model.safetensors)")
    else:
        if dtype is not None:
            model = model.to(dtype)
        meta = {"source": os.path.abspath(args.ckpt)}
        if args.model:
            meta["model"] = args.model
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        save_safetensors(model, out, metadata=meta)
        print(f"wrote {out}")
    return 0


def add_cli(subparsers):
    """Add the `export` subcommand to the `duodiff-fast` parser."""
    p = subparsers.add_parser("export", help="write a model as a diffusers DiT folder or as safetensors",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=["diffusers", "safetensors"],
                   help="diffusers: a DiTTransformer2DModel folder (DiT only); safetensors: one file")
    p.add_argument("--ckpt", required=True, help="checkpoint file (.pt/.pth/.safetensors) or diffusers folder")
    p.add_argument("--model", default=None,
                   help="preset name or JSON spec of --ckpt (optional when --ckpt is a diffusers folder)")
    p.add_argument("--out", required=True, help="output folder (diffusers) or file (safetensors)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="cast the weights (default: float32, the dtype models are built in)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)
    return p

"""`duodiff-fast` command line: info, sample, train, eval, demo (and the subcommands of later modules).

User errors (a bad option, a missing file, an unwritable --out, inputs the library refuses) print one
line, `duodiff-fast: error: ...`, and exit with status 2; set DUODIFF_DEBUG=1 to see the traceback.
Arguments and the output folder are checked before any long work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ._validate import argtype_float, argtype_int

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROG = "duodiff-fast"
DEBUG_ENV = "DUODIFF_DEBUG"


class CLIError(Exception):
    """A user error found by a subcommand (printed as one line, exit status 2)."""


def _one_line(text: str) -> str:
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts) if parts else "(no message)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `duodiff-fast: error: <message> (see duodiff-fast <cmd> --help)`."""

    def error(self, message):
        hint = f" (see {self.prog} --help)"
        sys.stderr.write(f"{PROG}: error: {_one_line(message)}{hint}\n")
        raise SystemExit(2)


# -----------------------------------------------------------------------------
# helpers shared by subcommands
# -----------------------------------------------------------------------------

def parse_switch(text: str):
    """'0.3' -> fraction of steps; 't=600' or an integer > 1 -> absolute timestep."""
    from .sampling import AtTimestep
    text = text.strip()
    try:
        if text.startswith("t="):
            value = float(text[2:])
            if not value == value or value in (float("inf"), float("-inf")) or value < 0:
                raise ValueError
            return AtTimestep(value)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"switch {text!r}: expected a fraction of the steps in [0, 1] "
                                         "or an absolute timestep written t=600") from None
    if not value == value or value < 0:
        raise argparse.ArgumentTypeError(f"switch {text!r}: a fraction must lie in [0, 1]")
    if value > 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"switch {text!r}: a fraction must lie in [0, 1]; "
                                             "an absolute timestep is written t=600")
        return AtTimestep(int(value))
    return value


def parse_solver(text: str):
    """'ddim' / 'ddpm' / 'dpmsolver++' (any case), or 'diffusers:<SchedulerClass>'."""
    t = text.strip()
    if t.lower().startswith("diffusers:"):
        name = t.split(":", 1)[1].strip()
        if not name:
            raise argparse.ArgumentTypeError("diffusers:<SchedulerClass> needs a class name, e.g. "
                                             "diffusers:UniPCMultistepScheduler")
        return "diffusers:" + name
    if t.lower() not in ("ddim", "ddpm", "dpmsolver++"):
        raise argparse.ArgumentTypeError(f"unknown solver {text!r}; choose ddim, ddpm, dpmsolver++ or "
                                         "diffusers:<SchedulerClass>")
    return t.lower()


def parse_cfg(text: str):
    """'--cfg 4.0' (diffusers' convention; >= 0), 'preset' (the preset's recommended scale) or 'off'."""
    t = text.strip().lower()
    if t in ("preset", "off", "none"):
        return "preset" if t == "preset" else None
    return argtype_float(minimum=0.0)(text)


def parse_shallow_cfg(text: str):
    """'--shallow-cfg 2.0' (the shallow steps' own scale, >= 0), 'same' (= --cfg) or 'off' (unguided: 1)."""
    t = text.strip().lower()
    if t in ("same", "off", "none"):
        return None if t == "same" else 1.0
    return argtype_float(minimum=0.0)(text)


def build_model(spec: str, ckpt: str | None, device, dtype):
    """A preset name (random weights unless `ckpt`) or a checkpoint with a preset: 'preset' + path."""
    import torch

    from .models import create_model, load_checkpoint
    if ckpt:
        model = load_checkpoint(ckpt, spec)
    else:
        model = create_model(spec)
    return model.to(device=device, dtype=getattr(torch, DTYPES[dtype])).eval()


def _add_sampling_args(p):
    p.add_argument("--deep", required=True, help="preset name of the deep model (see `duodiff-fast info --presets`)")
    p.add_argument("--shallow", default=None, help="preset of the shallow model (default: <deep>_shallow)")
    p.add_argument("--deep-ckpt", default=None, help=".pt/.pth/.safetensors for the deep model (default: random weights)")
    p.add_argument("--shallow-ckpt", default=None, help="checkpoint for the shallow model")
    p.add_argument("--switch", type=parse_switch, default=0.3,
                   help="fraction of steps on the shallow model (0 = deep only), or t=600 for a timestep")
    p.add_argument("--solver", default="ddim", type=parse_solver,
                   help="ddim | ddpm | dpmsolver++ (the library's solvers, CUDA-graph capturable), or "
                        "diffusers:<SchedulerClass> (e.g. diffusers:UniPCMultistepScheduler; eager, needs diffusers)")
    p.add_argument("--steps", type=argtype_int(1), default=50)
    p.add_argument("--eta", type=argtype_float(0.0, 1.0), default=0.0, help="DDIM eta in [0, 1]")
    p.add_argument("--cfg", type=parse_cfg, default="preset",
                   help="classifier-free guidance scale in diffusers' convention (uncond + w (cond - uncond); "
                        "upstream U-ViT's s is w - 1); default 'preset': the preset's recommended scale "
                        "(`duodiff-fast info --presets`), none for presets without one; 'off' disables")
    p.add_argument("--shallow-cfg", type=parse_shallow_cfg, default=None,
                   help="guidance scale of the shallow steps only (same convention); default 'same' "
                        "(= --cfg); 'off' runs them unguided (one forward per step)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))


# -----------------------------------------------------------------------------
# sample
# -----------------------------------------------------------------------------

def cmd_sample(args):
    """Sample `--n` images, sharded over processes under torchrun (each rank writes shard_XXX.npz with
    the global indices; rank 0 merges them into samples.npz after a barrier). Sample i depends only on
    (--seed, --batch-size, i), so any number of processes writes the same samples.npz."""
    import numpy as np
    import torch

    from .data import save_grid
    from .distributed import all_reduce_max, barrier, distributed_session
    from .sampling.sharded import merge_shards, remove_shards, sample_sharded
    from .models.configs import SHALLOW_DEPTH, get_preset, is_latent
    from .models.configs import load_spec as spec_of
    from .sampling import DuoSampler

    from . import _io
    deep_spec = spec_of(args.deep)
    _io.check_writable_dir(args.out, "--out")  # before loading models or sampling anything
    with distributed_session(args.device) as (rank, world, device):
        if args.shallow:
            shallow_spec, shallow_name = spec_of(args.shallow), args.shallow
        elif args.deep.endswith(".json") or os.path.isfile(args.deep):
            shallow_spec = dict(deep_spec, kwargs=dict(deep_spec["kwargs"], depth=SHALLOW_DEPTH))
            shallow_spec.pop("preset", None)
            shallow_name = f"{args.deep} (depth {SHALLOW_DEPTH})"
        else:
            shallow_name = f"{args.deep}_shallow"
            shallow_spec = get_preset(shallow_name)
        if (args.deep_ckpt is None or args.shallow_ckpt is None) and rank == 0:
            warnings.warn("sampling with random weights for a model without --*-ckpt: the images are noise "
                          "(useful for timing only)", stacklevel=1)
        torch.manual_seed(args.seed)  # random-weight models must be identical on every rank
        deep = build_model(deep_spec, args.deep_ckpt, device, args.dtype)
        shallow = build_model(shallow_spec, args.shallow_ckpt, device, args.dtype)
        schedule = getattr(deep, "schedule_spec", None) or deep_spec["schedule"]
        cfg = args.cfg
        if cfg == "preset":
            cfg = deep_spec.get("cfg_scale") if getattr(deep, "num_classes", 0) else None
            if cfg is not None and rank == 0:
                print(f"guidance: the preset's recommended cfg_scale {cfg:g} (--cfg off to disable)")
        solver = args.solver
        if solver.startswith("diffusers:"):
            from .sampling.diffusers_loop import make_scheduler
            solver = make_scheduler(solver.split(":", 1)[1], schedule)
        sampler = DuoSampler(shallow, deep, schedule=schedule, solver=solver, steps=args.steps,
                             switch=args.switch, cfg_scale=cfg, shallow_cfg_scale=args.shallow_cfg,
                             eta=args.eta)
        latent = is_latent(deep_spec, sampler.in_channels)
        if args.vae is not None:  # checked before sampling: a wrong folder fails now, not after the run
            if not latent:
                raise CLIError(f"--vae {args.vae}: {args.deep} is a pixel model; --vae decodes latent models only")
            from .vae import check_vae_folder
            check_vae_folder(args.vae, latent_channels=sampler.in_channels)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            remove_shards(args.out)  # shards of an earlier run (maybe with more ranks) would not merge
        barrier()
        res = sample_sharded(sampler, args.n, args.batch_size, args.seed, args.out, rank, world,
                             progress=True, latent=latent)
        seconds = all_reduce_max(res["seconds"], device)  # the slowest rank sets the wall-clock
        barrier()
        if rank != 0:
            return 0
        npz = merge_shards(args.out)
        meta = dict(deep=args.deep, shallow=shallow_name, switch=str(args.switch), shallow_steps=sampler.k,
                    steps=args.steps, solver=args.solver, n=args.n, batch_size=args.batch_size,
                    seed=args.seed, cfg=sampler.cfg_scale, shallow_cfg=sampler.shallow_cfg_scale,
                    cfg_channels=sampler.cfg_channels, seconds=seconds,
                    images_per_s=args.n / seconds if seconds else None,
                    device=str(device), world_size=world)
        _io.write_json(os.path.join(args.out, "samples.json"), meta)
        rate = f"{args.n / seconds:.2f} images/s" if seconds else "n/a images/s"
        print(f"wrote {npz} ({args.n} samples, {sampler.k}/{args.steps} steps on the shallow model, "
              f"{rate} on {world} x {device.type})")
        if latent and args.vae is not None:
            from .models.configs import LATENT_SCALE
            from .vae import decode_and_save
            dec = decode_and_save(args.out, args.vae, latent_scale=deep_spec.get("latent_scale", LATENT_SCALE),
                                  device=device, batch_size=args.batch_size)
            meta["vae"] = args.vae
            _io.write_json(os.path.join(args.out, "samples.json"), meta)
            print(f"decoded {dec['n']} latents with {args.vae}: {dec['samples']} (uint8 images), "
                  f"{dec['latents']}, {dec['images']}/, {dec['grid']}")
        elif not latent:
            with np.load(npz) as z:
                u8 = z["arr_0"][:64]
            grid = os.path.join(args.out, "grid.png")
            with _io.atomic_path(grid) as tmp:
                save_grid(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0, tmp)
            print(f"wrote {grid}")
        else:
            print("latent model: samples.npz holds latents; pass --vae PATH (a local diffusers AutoencoderKL "
                  "folder, e.g. DiT-XL-2-256/vae) to write images")
        return 0


# -----------------------------------------------------------------------------
# info
# -----------------------------------------------------------------------------

def cmd_info(args):
    if args.presets:
        from .models import PRESETS
        for name, p in PRESETS.items():
            cfg = p.get("cfg_scale")
            guide = "cfg=-" if cfg is None else f"cfg={cfg:g}"
            if cfg is not None and p.get("cfg_channels"):
                guide += f"[{p['cfg_channels']}ch]"
            print(f"{name:32s} {p['family']:5s} time={p['time_convention']:9s} "
                  f"schedule={p['schedule']['name']:14s} {guide:12s} {p.get('description', '')}")
        print("\ncfg: recommended classifier-free guidance in diffusers' convention, uncond + w (cond - uncond) "
              "(upstream U-ViT's s is w - 1); [3ch]: the official sampler guides the first 3 channels only")
        return 0
    from .info import main as info_main
    return info_main([])


# -----------------------------------------------------------------------------
# entry point
# -----------------------------------------------------------------------------

def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, devices and the backend each op would use")
    p.add_argument("--presets", action="store_true", help="list the model presets instead")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="sample with DuoSampler; writes samples.npz and grid.png")
    _add_sampling_args(p)
    # --num-samples: under torchrun, `--n` is taken as an ambiguous prefix of torchrun's own flags
    p.add_argument("--n", "--num-samples", dest="n", type=argtype_int(1), default=16, help="number of samples")
    p.add_argument("--batch-size", type=argtype_int(1), default=16)
    p.add_argument("--seed", type=argtype_int(0), default=0)
    p.add_argument("--out", default="out/samples")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="local diffusers AutoencoderKL folder: decode latents to images (latent presets)")
    p.set_defaults(func=cmd_sample)

    for mod in ("train", "train_exits", "eval", "demo", "export", "profile"):
        try:
            module = __import__(f"duodiff_fast.{mod}", fromlist=["add_cli"])
        except ImportError as e:  # a subcommand whose module has not landed is simply absent
            if e.name != f"duodiff_fast.{mod}":
                raise
            continue
        module.add_cli(sub)
    return parser


# Exceptions that mean "the user asked for something that cannot be done", reported in one line.
USER_ERRORS = (CLIError, ValueError, TypeError, KeyError, OSError, ImportError)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        text = f"{e.strerror or e}: {e.filename}"
    else:
        text = str(e)
    return _one_line(text or type(e).__name__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_message(e)}  ({DEBUG_ENV}=1 shows the traceback)\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`duodiff-fast profile` and `duodiff-fast calibrate`: the phase-transition profile of an early-exit model,
and the choice of a DuoDiff switch point for a shallow/deep pair.

    duodiff-fast profile --demo --out out/profile                  # the shipped demo model and exit heads
    duodiff-fast profile --backbone runs/deep/model.json --backbone-ckpt runs/deep/ema.safetensors \\
        --exits runs/exits/exits.safetensors --thresholds 0.05,0.1 --out out/profile
    duodiff-fast calibrate --demo --out out/calibrate
    duodiff-fast calibrate --deep runs/deep/model.json --deep-ckpt runs/deep/ema.safetensors \\
        --shallow-ckpt runs/shallow/ema.safetensors --out out/calibrate [--exits ...]
"""
from __future__ import annotations

import os

from . import _io
from ._validate import argtype_float, argtype_int


def _floats(text):
    import argparse
    parse = argtype_float(0.0, 1.0)
    try:
        return [parse(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"thresholds: {e}") from None


def _demo_exit_path(variant):
    from .demo import ASSETS
    return ASSETS / f"demo_exits_{variant}.safetensors"


def _exit_model(args):
    from .train_exits import load_exit_model
    if args.demo:
        from .demo import load_demo_pair
        _, deep = load_demo_pair(args.device or "cpu")
        path = args.exits or _demo_exit_path(args.variant or "duodiff")
        return load_exit_model(deep, path, variant=args.variant), deep
    if not (args.backbone and args.backbone_ckpt and args.exits):
        raise ValueError("profile: pass --demo, or --backbone, --backbone-ckpt and --exits")
    from .models import load_checkpoint
    from .models.configs import load_spec
    deep = load_checkpoint(args.backbone_ckpt, load_spec(args.backbone)).to(args.device or "cpu").eval()
    return load_exit_model(deep, args.exits, variant=args.variant), deep


def cmd_profile(args):
    from .sampling.early_exit import DEFAULT_THRESHOLDS, profile_exits
    _io.check_writable_dir(args.out, "--out")
    model, _ = _exit_model(args)
    if args.thresholds is None:  # the heads' own variant decides what a threshold means
        args.thresholds = list(DEFAULT_THRESHOLDS[model.variant])
    res = profile_exits(model, args.thresholds, n=args.n, steps=args.steps, seed=args.seed, out=args.out,
                        progress=True)
    for p in res["profiles"]:
        first, last = p["mean_exit"][0], p["mean_exit"][-1]
        print(f"threshold {p['threshold']:g}: mean exit layer {first:.2f} at the first step -> {last:.2f} at the "
              f"last (depth {res['depth']}; {res['rule']})")
    print(f"wrote {os.path.join(args.out, 'exits.json')} and exits.png")
    return 0


def _threshold(args, exit_model):
    from .sampling.early_exit import DEFAULT_THRESHOLDS
    return args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS[exit_model.variant][0]


def cmd_calibrate(args):
    from .sampling.early_exit import calibrate_switch, profile_exits
    _io.check_writable_dir(args.out, "--out")
    profile = None
    if args.demo:
        from .demo import load_demo_pair
        shallow, deep = load_demo_pair(args.device or "cpu")
        if _demo_exit_path("duodiff").is_file():
            from .train_exits import load_exit_model
            em = load_exit_model(deep, _demo_exit_path("duodiff"))
            profile = profile_exits(em, [_threshold(args, em)], n=min(args.n, 32), steps=args.steps, seed=args.seed)
    else:
        if not (args.deep and args.deep_ckpt and args.shallow_ckpt):
            raise ValueError("calibrate: pass --demo, or --deep, --deep-ckpt and --shallow-ckpt")
        from .cli import build_model
        from .models.configs import SHALLOW_DEPTH, load_spec
        deep_spec = load_spec(args.deep)
        shallow_spec = load_spec(args.shallow) if args.shallow else dict(
            deep_spec, kwargs=dict(deep_spec["kwargs"], depth=SHALLOW_DEPTH))
        device = args.device or "cpu"
        deep = build_model(deep_spec, args.deep_ckpt, device, "fp32")
        shallow = build_model(shallow_spec, args.shallow_ckpt, device, "fp32")
        if args.exits:
            from .train_exits import load_exit_model
            em = load_exit_model(deep, args.exits)
            profile = profile_exits(em, [_threshold(args, em)], n=min(args.n, 32), steps=args.steps, seed=args.seed)
    kw = {"clip_sample": args.clip_sample} if args.clip_sample else {}
    res = calibrate_switch(shallow, deep, n=args.n, steps=args.steps, tolerance_db=args.tolerance_db,
                           seed=args.seed, profile=profile, out=args.out, **kw)
    for r in res["rows"]:
        print(f"switch {r['switch']:.1f}: {r['shallow_steps']}/{r['steps']} shallow steps, speed-up "
              f"{r['speedup']:.2f}x (theory {r['theoretical_speedup']:.2f}x), PSNR vs deep {r['psnr_vs_deep']:.1f} dB")
    msg = f"chosen switch {res['chosen_switch']:g} (largest shallow share with PSNR >= {res['tolerance_db']:g} dB)"
    if "profile_switch" in res:
        msg += f"; the exit profile suggests {res['profile_switch']:.2f}"
    print(msg)
    print(f"wrote {os.path.join(args.out, 'calibrate.json')} and calibrate.png")
    return 0


def add_cli(sub):
    from .sampling.early_exit import DEFAULT_TOLERANCE_DB
    p = sub.add_parser("profile", help="phase-transition profile of an early-exit model: exits.json + PNG")
    p.add_argument("--demo", action="store_true", help="the shipped demo deep model and its exit heads")
    p.add_argument("--backbone", default=None, help="preset or JSON spec of the deep model")
    p.add_argument("--backbone-ckpt", default=None)
    p.add_argument("--exits", default=None, help="exits.safetensors from `duodiff-fast train-exits`")
    p.add_argument("--variant", default=None, choices=["duodiff", "adadiff"],
                   help="which heads (--demo: default duodiff; else the --exits file says, and a contradiction is an error)")
    p.add_argument("--thresholds", type=_floats, default=None,
                   help=f"comma list in [0, 1] (default, by the heads' variant: {_default_thresholds_text()})")
    p.add_argument("--n", type=argtype_int(1), default=64)
    p.add_argument("--steps", type=argtype_int(1), default=25)
    p.add_argument("--seed", type=argtype_int(0), default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="out/profile")
    p.set_defaults(func=cmd_profile)

    c = sub.add_parser("calibrate", help="pick a DuoDiff switch: sweep, fidelity vs deep-only, speed-up, PNG")
    c.add_argument("--demo", action="store_true", help="the shipped demo pair")
    c.add_argument("--deep", default=None)
    c.add_argument("--deep-ckpt", default=None)
    c.add_argument("--shallow", default=None, help="preset or JSON spec (default: the deep spec with 3 blocks)")
    c.add_argument("--shallow-ckpt", default=None)
    c.add_argument("--exits", default=None, help="exit heads of the deep model: also report the profile's switch")
    c.add_argument("--threshold", type=argtype_float(0.0, 1.0), default=None,
                   help="for the profile's suggestion (default: the first of the heads' variant's profile defaults)")
    c.add_argument("--tolerance-db", type=argtype_float(0.0), default=DEFAULT_TOLERANCE_DB,
                   help=f"PSNR vs deep-only the chosen switch must keep (default {DEFAULT_TOLERANCE_DB:g} dB; "
                        "see README)")
    c.add_argument("--n", type=argtype_int(1), default=64)
    c.add_argument("--steps", type=argtype_int(1), default=25)
    c.add_argument("--clip-sample", type=argtype_float(0.0), default=1.0)
    c.add_argument("--seed", type=argtype_int(0), default=0)
    c.add_argument("--device", default=None)
    c.add_argument("--out", default="out/calibrate")
    c.set_defaults(func=cmd_calibrate)


def _default_thresholds_text():
    from .sampling.early_exit import DEFAULT_THRESHOLDS
    return "; ".join(f"{v}: {','.join(f'{t:g}' for t in ts)}" for v, ts in DEFAULT_THRESHOLDS.items())

"""`duodiff-fast train-exits`: train early-exit probes and heads on a frozen backbone.

The backbone (a trained deep model: preset or JSON spec plus weights) stays frozen; an `EarlyExitModel`
of the chosen variant ('duodiff' probes + per-exit heads, or 'adadiff' confidence maps + one shared head)
is trained with that variant's losses (models/exits.py) on noised training images, with the same noise,
timesteps and label dropout as `duodiff-fast train`. A run folder holds `checkpoints/step_*.pt` (exit
parameters, optimizer, scheduler, step, RNG state: resume is exact), `exits.safetensors` (the exit
parameters, with the variant, the backbone spec and the backbone's fingerprint in the metadata),
`config.json` and `log.jsonl`. Like `train`, it refuses a folder that already holds a run unless --resume or
--overwrite, and a resume refuses another backbone, variant or dataset than the run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from . import _io
from ._validate import ArgumentError, check_choice, check_float, check_int
from .train import (CKPT_DIR, CKPT_FORMAT, WarmupCosine, _CKPT_NAME, _Batch, _prune,
                    _rng_state, _set_rng_state, _step_seed, _truncate_log, list_checkpoints,
                    load_intact_checkpoint, resolve_spec, run_contents, _describe_run)

__all__ = ["ExitTrainConfig", "train_exits", "load_exit_model", "backbone_fingerprint", "add_cli"]

EXPORT = "exits.safetensors"


@dataclass
class ExitTrainConfig:
    backbone: str | dict = "uvit_shapes32_demo"  # preset, JSON spec, or spec dict of the deep model
    backbone_ckpt: str | None = None             # its weights ('demo' = the shipped demo deep model)
    variant: str = "duodiff"
    data: str | None = None                      # None: what the backbone was trained on (its export says), else 'shapes'
    data_kwargs: dict = field(default_factory=dict)
    out: str = "runs/exits"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    stop_at: int | None = None
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    device: str | None = None
    progress: bool = True

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self):
        w = "train-exits"
        check_choice(self.variant, "variant", ("duodiff", "adadiff"), where=w, case_insensitive=False)
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("ckpt_every", 0),
                         ("keep_checkpoints", 0), ("log_every", 1)):
            check_int(getattr(self, name), name, minimum=lo, where=w)
        if self.stop_at is not None:
            check_int(self.stop_at, "stop_at", minimum=0, where=w)
        check_float(self.lr, "lr", minimum=0.0, where=w)
        check_float(self.weight_decay, "weight_decay", minimum=0.0, where=w)
        check_float(self.grad_clip, "grad_clip", minimum=0.0, where=w)
        v = check_float(self.label_dropout, "label_dropout", minimum=0.0, maximum=1.0, where=w)
        if v >= 1.0:
            raise ArgumentError(f"{w}: label_dropout must be < 1, got {v:g}")
        if len(tuple(self.betas)) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ArgumentError(f"{w}: betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.resume and self.overwrite:
            raise ArgumentError(f"{w}: resume and overwrite exclude each other")
        return self


def _backbone(cfg, device):
    """The frozen deep model: the shipped demo one, or a spec + checkpoint."""
    if cfg.backbone_ckpt == "demo":
        from .demo import ASSETS, DEMO_FILES, load_demo_model
        return load_demo_model(ASSETS / DEMO_FILES["deep"], device)
    from .models import load_checkpoint
    spec = resolve_spec(cfg.backbone)
    if cfg.backbone_ckpt is None:
        raise ArgumentError("train-exits: pass --backbone-ckpt (the trained deep model's weights, or 'demo')")
    return load_checkpoint(cfg.backbone_ckpt, spec).to(device).eval()


def backbone_fingerprint(model) -> str:
    """A short hash of a backbone's weights, rounded to float16 first, so the float32 EMA a head was trained
    on and its float16 export (the shipped demo weights) agree, and any retrained model differs."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().to("cpu")
        h.update((t.to(torch.float16) if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Settings a resumed run must share with the run it continues (the rest may change, e.g. stop_at).
_RESUME_KEYS = ("variant", "backbone", "backbone_ckpt", "data")


def train_exits(cfg: ExitTrainConfig) -> dict:
    """Train (or resume) exit heads; returns dict(out, checkpoint, export, step, final_loss)."""
    from .data import get_dataset
    from .models.exits import EarlyExitModel

    cfg.validate()
    out = os.fspath(cfg.out)
    existing = run_contents(out) + ([os.path.join(out, EXPORT)] if os.path.isfile(os.path.join(out, EXPORT))
                                    else []) if os.path.isdir(out) else []
    if existing and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"train-exits: {out!r} already holds a run ({_describe_run(existing, out)}); pass "
                              "--resume to continue it, or --overwrite to delete that run's files and start over")
    if existing and cfg.overwrite:
        for f in existing:
            os.remove(f)
    _io.check_writable_dir(os.path.join(out, CKPT_DIR), "train-exits --out")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    backbone = _backbone(cfg, device)
    model = EarlyExitModel(backbone, cfg.variant).to(device)
    from .sampling import get_schedule
    if getattr(backbone, "schedule_spec", None) is None:
        raise ArgumentError("train-exits: the backbone carries no schedule_spec (build it from a preset or spec)")
    schedule = get_schedule(backbone.schedule_spec)
    spec = dict(time_convention=backbone.time_convention, latent=bool(getattr(backbone, "latent", False)))
    data = cfg.data or getattr(backbone, "training_data", None) or "shapes"
    cfg = dataclasses.replace(cfg, data=data)  # config.json records the dataset used
    dataset = get_dataset(data, **cfg.data_kwargs)
    batcher = _Batch(backbone, schedule, spec, dataset, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, cfg.steps))

    start, resume_path = 0, None
    if cfg.resume:
        where = out if cfg.resume in ("latest", "auto") else os.fspath(cfg.resume)
        try:
            resume_path, ck = load_intact_checkpoint(where)
        except FileNotFoundError:
            ck = None
            warnings.warn(f"--resume: no checkpoint in {where}: starting from step 0", stacklevel=2)
        if ck is not None:
            if ck.get("variant") != cfg.variant:
                raise ArgumentError(f"--resume {resume_path}: that run trained {ck.get('variant')!r} exits, "
                                    f"not {cfg.variant!r}")
            old = ck.get("config") or {}
            diff = [k for k in _RESUME_KEYS if k in old and old[k] != getattr(cfg, k)]
            if diff:
                raise ArgumentError(f"--resume {resume_path}: that run trained with other "
                                    + ", ".join(f"{k} ({old[k]!r}, now {getattr(cfg, k)!r})" for k in diff)
                                    + "; resume with the same settings, or start a new --out")
            fp = ck.get("backbone_fingerprint")
            if fp is not None and fp != backbone_fingerprint(backbone):
                raise ArgumentError(f"--resume {resume_path}: the backbone's weights changed since that run "
                                    "(fingerprint differs); resume with the same --backbone-ckpt, or start a new --out")
            model.load_exit_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start = int(ck["step"])
            if ck.get("rng") is not None:
                _set_rng_state(ck["rng"], device)
    end = cfg.steps if cfg.stop_at is None else max(start, min(cfg.steps, cfg.stop_at))
    own = [c for c in list_checkpoints(out) if resume_path is not None
           and int(_CKPT_NAME.fullmatch(os.path.basename(c)).group(1)) <= start]
    log_path = os.path.join(out, "log.jsonl")
    _io.write_json(os.path.join(out, "config.json"), cfg.to_dict())
    if resume_path is not None:
        _truncate_log(log_path, start)
    export = os.path.join(out, EXPORT)
    fingerprint = backbone_fingerprint(backbone)

    def save(step):
        path = os.path.join(out, CKPT_DIR, CKPT_FORMAT.format(step=step))
        _io.torch_save(dict(step=step, model=model.exit_state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), rng=_rng_state(device), variant=cfg.variant,
                            config=cfg.to_dict(), backbone_fingerprint=fingerprint), path)
        if path not in own:
            own.append(path)
        _prune(own, cfg.keep_checkpoints)
        meta = {"format": "duodiff-fast-exits", "variant": cfg.variant, "step": step,
                "backbone": json.dumps(cfg.backbone) if isinstance(cfg.backbone, dict) else str(cfg.backbone),
                "exits": json.dumps(model.exits), "backbone_fingerprint": fingerprint}
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.exit_state_dict().items()}
        _io.save_safetensors_dict(sd, export, metadata=meta)
        return path

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train-exits ({cfg.variant})", unit="step",
               disable=not cfg.progress)
    gen = torch.Generator(device=device)
    n = len(dataset)
    final = float("nan")
    ckpt = resume_path
    with open(log_path, "a" if resume_path else "w") as log:
        for step in range(start, end):
            g = torch.Generator().manual_seed(_step_seed(cfg.seed, 0, step))
            idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
            x0, y = dataset.batch(idx)
            gen.manual_seed(_step_seed(cfg.seed, 1, step))
            xt, tm, y, eps = batcher(x0, y, gen)
            res = model.exit_losses(xt, tm, y, eps)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            final = float(res["loss"].detach())
            s = step + 1
            bar.update(1)
            if s % cfg.log_every == 0 or s == end:
                rec = dict(step=s, loss=final, l_score=float(res["l_score"]), l_ual=float(res["l_ual"]),
                           mse=res["mse"], u_hat=res["u_hat"], lr=opt.param_groups[0]["lr"])
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{final:.4f}")
                if not math.isfinite(final):
                    raise FloatingPointError(f"train-exits: loss is {final} at step {s}")
            if cfg.ckpt_every and s % cfg.ckpt_every == 0 and s != end:
                ckpt = save(s)
        bar.close()
    if end > start:
        ckpt = save(end)
    elif resume_path is not None and not os.path.isfile(export):
        save(start)  # a finished run whose export went missing: rewrite it
    return dict(out=out, checkpoint=ckpt, export=export, step=end, final_loss=final)


def load_exit_model(backbone, path, variant=None):
    """An EarlyExitModel on `backbone` with the exit parameters of `path` (exits.safetensors), loaded
    strictly: the variant comes from the file's metadata (a `variant` that contradicts it is an error).
    Heads trained on other backbone weights than `backbone`'s (the fingerprint in the file differs) load
    with a warning: their scores were fitted to another model's features."""
    from safetensors import safe_open

    from .models.exits import EarlyExitModel
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exit heads not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- any unreadable file: one clear error naming it
        raise ValueError(f"{path} is not a readable exits.safetensors ({type(e).__name__}: {e})") from None
    v = variant or meta.get("variant")
    if v is None:
        raise ValueError(f"{path}: no 'variant' in its metadata; pass variant='duodiff' or 'adadiff'")
    if variant is not None and meta.get("variant") not in (None, variant):
        raise ValueError(f"{path} holds {meta['variant']!r} exit heads, not {variant!r}")
    fp = meta.get("backbone_fingerprint")
    if fp is not None and fp != backbone_fingerprint(backbone):
        warnings.warn(f"{path}: these exit heads were trained on other backbone weights (fingerprint {fp}, this "
                      f"backbone {backbone_fingerprint(backbone)}); their exit scores may not fit it: retrain them "
                      "with `duodiff-fast train-exits` on this model", stacklevel=2)
    p = next(backbone.parameters())
    model = EarlyExitModel(backbone, v).to(p.device)
    model.load_exit_state_dict({k: t.to(p.device) for k, t in sd.items()}, strict=True)
    return model.eval()


def cmd_train_exits(args) -> int:
    cfg = ExitTrainConfig(backbone=args.backbone, backbone_ckpt=args.backbone_ckpt, variant=args.variant,
                          data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=args.warmup_steps, seed=args.seed, resume=args.resume,
                          overwrite=args.overwrite, stop_at=args.stop_at, ckpt_every=args.ckpt_every,
                          log_every=args.log_every, device=args.device, progress=not args.no_progress)
    res = train_exits(cfg)
    print(f"step {res['step']}: loss {res['final_loss']:.4f}; wrote {res['export']}")
    return 0


def add_cli(subparsers):
    from ._validate import argtype_float, argtype_int
    d = ExitTrainConfig()
    p = subparsers.add_parser("train-exits", help="train early-exit probes and heads on a frozen deep model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=d.backbone, help="preset or JSON spec of the deep model")
    p.add_argument("--backbone-ckpt", default=None, help="its weights; 'demo' = the shipped demo deep model")
    p.add_argument("--variant", default=d.variant, choices=["duodiff", "adadiff"])
    p.add_argument("--data", default=d.data,
                   help="dataset spec (default: the one the backbone was trained on, recorded in its export; else shapes)")
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=argtype_int(1), default=d.steps)
    p.add_argument("--batch-size", type=argtype_int(1), default=d.batch_size)
    p.add_argument("--lr", type=argtype_float(0.0), default=d.lr)
    p.add_argument("--warmup-steps", type=argtype_int(0), default=d.warmup_steps)
    p.add_argument("--seed", type=argtype_int(0), default=d.seed)
    p.add_argument("--resume", nargs="?", const="latest", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stop-at", type=argtype_int(0), default=None)
    p.add_argument("--ckpt-every", type=argtype_int(0), default=d.ckpt_every)
    p.add_argument("--log-every", type=argtype_int(1), default=d.log_every)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_exits)
    return p

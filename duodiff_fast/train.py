"""Train a deep or a shallow denoiser with the DuoDiff recipe (eps-prediction), on one or many processes.

Recipe (DESIGN.md §2): AdamW (lr 2e-4, wd 0.03 on every parameter as upstream U-ViT, betas 0.99/0.999),
linear warm-up then cosine decay, grad-norm clip 1.0, bf16 autocast on CUDA (fp32 on CPU), linear beta
schedule 1e-4..0.02 with T=1000, MSE on eps. The network sees t in its own time convention (DuoDiff
feeds t/1000: 'frac1000'). Class-conditional models whose label table has a null class get their labels
dropped to it with probability `label_dropout`, so classifier-free guidance works. EMA weights are kept
beside the raw ones and are what gets exported and sampled.

Schedule choice: `TrainConfig.schedule=None` keeps the model spec's schedule when it is discrete (DiT:
linear, U-ViT-H: scaled-linear) and uses the DuoDiff linear schedule for the continuous VP-SDE presets
(official U-ViT pixel models), switching their time convention from 'cont999' to 'frac1000'. The
effective spec is written to `<out>/model.json` and into every export, so what was trained is what
gets sampled: `duodiff-fast sample --deep <out>/model.json --deep-ckpt <out>/ema.safetensors`.

Exact resume: all randomness of step `s` (timesteps, noise, label dropout) comes from a generator
seeded by (seed, rank, s), and the data order of step `s` is a pure function of (seed, s), so a run
resumed from a checkpoint continues exactly where it stopped (bitwise on CPU). Global RNG states
(python, numpy, torch, CUDA) of every rank are saved too, for code that uses them (DiT's built-in label
dropout). Resume needs the same `steps` (the cosine schedule spans them) and `batch_size`.

Multi-process: under `torchrun --nproc_per_node N` the same `train` runs with DDP (NCCL on CUDA, gloo on
CPU); `batch_size` is the global batch, split evenly over ranks; only rank 0 writes files.

Outputs in `out`: `checkpoints/step_XXXXXXX.pt` (model, EMA, optimizer, scheduler, step, RNG states,
config), `ema.safetensors` (EMA weights + metadata: spec JSON, preset, step), `model.json`,
`config.json`, `log.jsonl` (step, loss, lr, grad_norm, images/s), `samples/step_XXXXXXX.png` grids.

`--init-from-deep` (shallow companions): see `init_from_deep` for the block mapping.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _io
from . import distributed as ddist
from ._validate import ArgumentError, check_choice, check_float, check_int, describe
from .conventions import TIME_CONVENTIONS, allowed_conventions, default_convention
from .conventions import label_range as _label_range

__all__ = ["TrainConfig", "train", "add_cli", "init_from_deep", "block_mapping", "EMA", "WarmupCosine",
           "resolve_spec", "latest_checkpoint"]

CKPT_DIR = "checkpoints"
CKPT_FORMAT = "step_{step:07d}.pt"


# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything one training run needs; defaults are the DuoDiff recipe."""
    model: str | dict = "uvit_cifar10_small"  # preset name, path to a JSON spec, or a spec dict
    data: str = "shapes"                      # dataset spec for duodiff_fast.data.get_dataset
    data_kwargs: dict = field(default_factory=dict)  # extra keywords for get_dataset (e.g. {'n': 1000})
    out: str = "runs/train"
    steps: int = 500_000                      # total optimizer steps (the cosine decay spans them)
    batch_size: int = 128                     # global batch (split over ranks)
    lr: float = 2e-4
    min_lr: float = 0.0                       # end of the cosine decay
    warmup_steps: int | None = None           # None: min(5000, steps // 10)
    weight_decay: float = 0.03
    betas: tuple = (0.99, 0.999)
    grad_clip: float = 1.0                    # max grad norm (0 = off)
    ema_decay: float = 0.9999
    ema_warmup: bool = True                   # decay_s = min(ema_decay, (1 + s) / (10 + s))
    label_dropout: float = 0.1                # probability of the null label (CFG); needs a null class
    min_snr_gamma: float | None = None        # Min-SNR-gamma loss weights min(SNR, gamma) / SNR (None: plain MSE)
    t_range: tuple | None = None              # (lo, hi[, p]) fractions of the diffusion time: with probability
                                              # p (default 1) draw t from [lo, hi] instead of the whole range
                                              # (a shallow companion trained on the noisy steps it samples)
    schedule: str | dict | None = None        # None: the spec's discrete schedule, else DuoDiff 'linear'
    time_convention: str | None = None        # None: the model's, when it fits the schedule
    precision: str = "auto"                   # 'auto' (bf16 autocast on CUDA, fp32 on CPU) | 'bf16' | 'fp32'
    seed: int = 0
    resume: str | None = None                 # 'latest' (newest in out/checkpoints, if any) or a path
    overwrite: bool = False                   # out already holds a run: delete its files and start over
    init_from_deep: str | None = None         # checkpoint of a trained deep model (shallow companions)
    stop_at: int | None = None                # stop after this step (as if preempted); the LR schedule
                                              # still spans `steps`
    ckpt_every: int = 5000                    # 0: only at the end of the run
    keep_checkpoints: int = 2                 # newest ones kept (0: all)
    sample_every: int = 5000                  # grid of EMA samples (0: never)
    sample_n: int = 16
    sample_steps: int = 50                    # DDIM steps for the grids
    log_every: int = 50
    num_workers: int = 0                      # DataLoader workers
    device: str | None = None                 # default: cuda:LOCAL_RANK when available, else cpu
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> "TrainConfig":
        """Check every field (named in the error, with its value) before any work starts; returns self."""
        w = "train"
        ci, cf = check_int, check_float
        ci(self.steps, "steps", minimum=1, where=w)
        ci(self.batch_size, "batch_size", minimum=1, where=w)
        cf(self.lr, "lr", minimum=0.0, where=w)  # 0 is allowed: it freezes the weights (tests use it)
        cf(self.min_lr, "min_lr", minimum=0.0, maximum=float(self.lr), where=w)
        if self.warmup_steps is not None:
            ci(self.warmup_steps, "warmup_steps", minimum=0, where=w)
        cf(self.weight_decay, "weight_decay", minimum=0.0, where=w)
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ArgumentError(f"{w}: betas must be two numbers (beta1, beta2) in [0, 1), got {describe(betas)}")
        for i, b in enumerate(betas):
            v = cf(b, f"betas[{i}]", minimum=0.0, maximum=1.0, where=w)
            if v >= 1.0:
                raise ArgumentError(f"{w}: betas[{i}] must be < 1, got {v:g}")
        cf(self.grad_clip, "grad_clip", minimum=0.0, where=w)
        cf(self.ema_decay, "ema_decay", minimum=0.0, maximum=1.0, where=w)
        if self.min_snr_gamma is not None:
            cf(self.min_snr_gamma, "min_snr_gamma", minimum=0.0, where=w)
            if not self.min_snr_gamma > 0:
                raise ArgumentError(f"{w}: min_snr_gamma must be > 0 (or None for plain MSE), "
                                    f"got {self.min_snr_gamma:g}")
        if self.t_range is not None:
            self.t_range = check_t_range(self.t_range, where=w)
        v = cf(self.label_dropout, "label_dropout", minimum=0.0, maximum=1.0, where=w)
        if v >= 1.0:
            raise ArgumentError(f"{w}: label_dropout must be < 1 (1 would never show a label), got {v:g}")
        check_choice(self.precision, "precision", ("auto", "bf16", "fp32"), where=w, case_insensitive=False)
        ci(self.seed, "seed", minimum=0, where=w)
        if self.stop_at is not None:
            ci(self.stop_at, "stop_at", minimum=0, where=w)
        ci(self.ckpt_every, "ckpt_every", minimum=0, where=w)
        ci(self.keep_checkpoints, "keep_checkpoints", minimum=0, where=w)
        ci(self.sample_every, "sample_every", minimum=0, where=w)
        ci(self.sample_n, "sample_n", minimum=1, where=w)
        ci(self.sample_steps, "sample_steps", minimum=1, where=w)
        ci(self.log_every, "log_every", minimum=1, where=w)
        ci(self.num_workers, "num_workers", minimum=0, where=w)
        if not isinstance(self.out, (str, os.PathLike)) or not os.fspath(self.out):
            raise ArgumentError(f"{w}: out must be a folder path, got {describe(self.out)}")
        if self.resume and self.overwrite:
            raise ArgumentError(f"{w}: resume and overwrite exclude each other (continue the run in "
                                f"{os.fspath(self.out)!r}, or delete it and start over)")
        if not isinstance(self.data_kwargs, dict):
            raise ArgumentError(f"{w}: data_kwargs must be a dict, got {describe(self.data_kwargs)}")
        return self


def check_t_range(value, where="train"):
    """(lo, hi) or (lo, hi, p) with 0 <= lo < hi <= 1 and 0 < p <= 1, as a tuple of floats with p filled in;
    a string 'lo,hi[,p]' (the command line's form) is parsed."""
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise ArgumentError(f"{where}: t_range must be 'lo,hi' or 'lo,hi,p' (numbers), got {value!r}") from None
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__len__") or len(value) not in (2, 3):
        raise ArgumentError(f"{where}: t_range must be (lo, hi) or (lo, hi, p), fractions of the diffusion time, "
                            f"got {describe(value)}")
    lo = check_float(value[0], "t_range lo", minimum=0.0, maximum=1.0, where=where)
    hi = check_float(value[1], "t_range hi", minimum=0.0, maximum=1.0, where=where)
    if not lo < hi:
        raise ArgumentError(f"{where}: t_range needs lo < hi, got lo={lo:g}, hi={hi:g}")
    p = check_float(value[2], "t_range p", minimum=0.0, maximum=1.0, where=where) if len(value) == 3 else 1.0
    if not p > 0:
        raise ArgumentError(f"{where}: t_range p must be > 0 (the probability of drawing t in [lo, hi]), got {p:g}")
    return (lo, hi, p)


# -----------------------------------------------------------------------------
# Model spec, schedule, learning rate, EMA
# -----------------------------------------------------------------------------

def resolve_spec(model) -> dict:
    """A preset name, a path to a JSON spec, or a spec dict -> a checked spec dict (a copy); see
    `duodiff_fast.models.configs.load_spec`."""
    from .models.configs import load_spec
    return load_spec(model)


def _schedule_dict(s) -> dict:
    return dict(s) if isinstance(s, dict) else {"name": str(s)}


def _effective_spec(cfg: TrainConfig, spec: dict) -> tuple[dict, object]:
    """Pick the training schedule and time convention (module docstring) and record them in the spec."""
    from .sampling import get_schedule
    if cfg.schedule is not None:
        sched = _schedule_dict(cfg.schedule)
    else:
        own = _schedule_dict(spec.get("schedule", {"name": "linear"}))
        sched = own if own.get("name") != "vpsde" else {"name": "linear"}
    schedule = get_schedule(sched)
    allowed = allowed_conventions(schedule.kind)
    conv = cfg.time_convention or spec.get("time_convention")
    if conv not in allowed:
        if cfg.time_convention is not None:
            raise ValueError(f"time_convention {cfg.time_convention!r} does not fit the {schedule.kind} "
                             f"schedule {schedule.name!r}; use one of {allowed}")
        conv = default_convention(schedule.kind)
    spec = dict(spec, schedule=sched, time_convention=conv)
    return spec, schedule


class WarmupCosine:
    """LR factor: linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    With `warmup`, update `s` (1-based) uses min(decay, (1 + s) / (10 + s)), so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        """The decay the next `update` uses."""
        s = self.num_updates + 1
        return min(self.decay, (1 + s) / (10 + s)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module):
        d = self.current_decay()
        self.num_updates += 1
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)  # e += (1 - d) (p - e)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict):
        self.num_updates = int(state["num_updates"])


# -----------------------------------------------------------------------------
# Shallow initialisation from a deep model
# -----------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^(in_blocks|out_blocks|blocks)\.(\d+)\.(.*)$")


def _block_counts(keys) -> dict:
    counts = {}
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def block_mapping(kind: str, n_shallow: int, n_deep: int) -> list:
    """Deep block index for each shallow block of a block list.

    - U-ViT 'in_blocks': the first ones (shallow in_blocks[i] <- deep in_blocks[i]);
    - U-ViT 'out_blocks': the last ones (shallow out_blocks[-1 - i] <- deep out_blocks[-1 - i]), so each
      copied out-block keeps its long-skip partner: out_blocks[-1] reads in_blocks[0] in both models;
    - DiT 'blocks' (no long skips): evenly spaced, always including the first and the last block
      (3 of 28 -> 0, 14, 27), so the shallow net keeps the input-side and output-side specialists.
    The mid block, embeddings, norms and head map by name.
    """
    if n_shallow > n_deep:
        raise ValueError(f"{kind}: the 'shallow' model has {n_shallow} blocks, more than the deep one "
                         f"({n_deep})")
    if kind == "in_blocks":
        return list(range(n_shallow))
    if kind == "out_blocks":
        return list(range(n_deep - n_shallow, n_deep))
    if n_shallow == 1:
        return [n_deep - 1]
    return [int(math.floor(i * (n_deep - 1) / (n_shallow - 1) + 0.5)) for i in range(n_shallow)]


def _read_state_dict(source) -> dict:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    from .models.checkpoint import read_state_dict  # clear errors; also reads diffusers DiT folders
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from_deep: no checkpoint at {path}")
    return read_state_dict(path)  # EMA weights preferred in training checkpoints


@torch.no_grad()
def init_from_deep(shallow: nn.Module, source) -> dict:
    """Copy a trained deep model's tensors into a shallow companion, in place.

    `source`: a module, a state dict, or a checkpoint path (.pt/.pth: EMA weights preferred; .safetensors).
    Shallow key `<list>.<i>.<rest>` takes deep key `<list>.<block_mapping(...)[i]>.<rest>`; every other key
    (patch/time/label embeddings, pos_embed, mid_block, final norm, decoder/head, final conv) takes the
    deep key of the same name. Only keys present in both with the same shape are copied.
    Returns {'copied': [(shallow_key, deep_key)], 'skipped': [shallow_key, ...]}.
    """
    deep_sd = _read_state_dict(source)
    own = shallow.state_dict()
    n_s, n_d = _block_counts(own), _block_counts(deep_sd)
    maps = {kind: block_mapping(kind, n, n_d.get(kind, 0)) for kind, n in n_s.items() if n_d.get(kind, 0)}
    copied, skipped = [], []
    for key, dst in own.items():
        m = _BLOCK_KEY.match(key)
        src_key = key
        if m:
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            src_key = f"{kind}.{maps[kind][i]}.{rest}" if kind in maps else None
        src = deep_sd.get(src_key) if src_key is not None else None
        if src is None or tuple(src.shape) != tuple(dst.shape):
            skipped.append(key)
            continue
        dst.copy_(src.to(dst.dtype))
        copied.append((key, src_key))
    if not copied:
        raise ValueError("init_from_deep: no tensor of the deep checkpoint matches the shallow model "
                         f"(shallow keys like {list(own)[:3]}, deep keys like {list(deep_sd)[:3]})")
    return {"copied": copied, "skipped": skipped}


# -----------------------------------------------------------------------------
# Data order: a pure function of (seed, step)
# -----------------------------------------------------------------------------

class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's indices for steps `start..end-1`. Step s uses epoch e = s // (N // B) with a
    permutation seeded by (seed, e); the global batch is split into `world` contiguous slices."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int, end: int):
        if n < global_batch:
            raise ValueError(f"dataset has {n} items, fewer than one global batch of {global_batch}")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.start, self.end = start, end
        self.per_epoch = n // global_batch  # the last partial batch of an epoch is dropped
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> list:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(ddist.batch_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        per = self.gb // self.world
        lo = j * self.gb + self.rank * per
        return self._perm[lo:lo + per].tolist()

    def __iter__(self):
        for s in range(self.start, self.end):
            yield self.indices(s)

    def __len__(self):
        return max(0, self.end - self.start)


def _step_seed(seed: int, rank: int, step: int) -> int:
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(rank), int(step), 7]).generate_state(
        2, np.uint32)
    return ((int(a) << 32) | int(b)) & 0x7FFFFFFFFFFFFFFF


# -----------------------------------------------------------------------------
# RNG states and checkpoints
# -----------------------------------------------------------------------------

def _rng_state(device) -> dict:
    # Stored as tensors / ints / lists so the checkpoint loads with torch.load(weights_only=True).
    ver, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [ver, list(internal), gauss], "numpy": [key, torch.from_numpy(keys.astype(np.int64)),
                                                                 int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device):
    ver, internal, gauss = state["python"]
    random.setstate((ver, tuple(internal), gauss))
    key, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_rng(device, world) -> list | None:
    """Every rank's RNG state, on rank 0 (None elsewhere)."""
    state = _rng_state(device)
    if world <= 1:
        return [state]
    state = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    out = [None] * world if ddist.is_main() else None
    torch.distributed.gather_object(state, out, dst=0)
    return out


_CKPT_NAME = re.compile(r"step_(\d+)\.pt")


def list_checkpoints(path: str) -> list:
    """`step_*.pt` files in `path` or `path/checkpoints`, oldest first (by step number)."""
    for d in (os.path.join(path, CKPT_DIR), path):
        if os.path.isdir(d):
            found = [(int(m.group(1)), f) for f in os.listdir(d) if (m := _CKPT_NAME.fullmatch(f))]
            if found:
                return [os.path.join(d, f) for _, f in sorted(found)]
    return []


def latest_checkpoint(path: str) -> str | None:
    """The newest `step_*.pt` in `path` or `path/checkpoints` (None when there is none); a file is
    returned as is."""
    if os.path.isfile(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def load_intact_checkpoint(path: str, warn=True):
    """(path, checkpoint dict) of the newest checkpoint that loads, in `path` (a run folder or a file).

    A damaged newest checkpoint (truncated by a crash, or corrupted) is named in a warning and the
    previous one is tried. Raises FileNotFoundError when there is none, ValueError when none loads."""
    if os.path.isfile(path):
        candidates = [path]
    else:
        candidates = list_checkpoints(path)[::-1]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint (checkpoints/step_*.pt) in {path}")
    errors = []
    for c in candidates:
        try:
            ck = torch.load(c, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or not {"model", "step"} <= set(ck):
                raise ValueError("not a duodiff-fast training checkpoint (no model/step)")
            return c, ck
        except Exception as e:  # noqa: BLE001 -- any unreadable file: say which, try the previous one
            errors.append(f"{c}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            if warn and c != candidates[-1]:
                warnings.warn(f"checkpoint {c} is damaged or unreadable ({errors[-1].split(': ', 1)[1]}); "
                              "resuming from the previous one", RuntimeWarning, stacklevel=2)
    raise ValueError("no readable checkpoint:\n  " + "\n  ".join(errors))


# Files a run writes into its folder (relative to it): what marks a folder as holding a run, and what
# --overwrite deletes. Nothing else in the folder is touched.
RUN_FILES = ("ema.safetensors", "model.json", "config.json", "log.jsonl")


def run_contents(out: str) -> list:
    """The run files present in `out` (checkpoints, export, spec, config, log, sample grids)."""
    found = [os.path.join(out, f) for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    found += list_checkpoints(out) if os.path.isdir(os.path.join(out, CKPT_DIR)) else []
    sdir = os.path.join(out, "samples")
    if os.path.isdir(sdir):
        found += sorted(os.path.join(sdir, f) for f in os.listdir(sdir) if re.fullmatch(r"step_\d+\.png", f))
    return found


def _describe_run(files: list, out: str) -> str:
    ckpts = [f for f in files if _CKPT_NAME.fullmatch(os.path.basename(f))]
    other = [os.path.relpath(f, out) for f in files if f not in ckpts]
    parts = []
    if ckpts:
        steps = [int(_CKPT_NAME.fullmatch(os.path.basename(c)).group(1)) for c in ckpts]
        parts.append(f"{len(ckpts)} checkpoint(s), newest at step {max(steps)}")
    if other:
        parts.append(", ".join(other[:6]) + (" ..." if len(other) > 6 else ""))
    return "; ".join(parts)


def _truncate_log(path: str, step: int):
    """Keep the log lines of steps <= `step` (atomically); unreadable lines are dropped too."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    _io.write_text(path, "".join(keep))


def _atomic_torch_save(obj, path):
    _io.torch_save(obj, path)  # a crash mid-write never leaves a truncated checkpoint under the real name


def _prune(own: list, keep: int):
    """Delete the oldest of this run's own checkpoints (`own`, oldest first) beyond `keep`."""
    if keep <= 0:
        return
    while len(own) > keep:
        victim = own.pop(0)
        if os.path.exists(victim):
            os.remove(victim)


def _export_ok(path: str, step: int) -> bool:
    """Whether `path` is a readable EMA export of `step`."""
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                f.get_tensor(k)
        return int(meta.get("step", -1)) == int(step)
    except Exception:  # noqa: BLE001 -- missing, truncated, not safetensors: all mean "rewrite it"
        return False


def _export_ema(ema_model, path, spec, step, data=""):
    meta = {"format": "duodiff-fast", "weights": "ema", "spec": json.dumps(spec), "step": str(step),
            "preset": spec.get("preset", ""), "data": str(data or "")}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in ema_model.state_dict().items()}
    _io.save_safetensors_dict(sd, path, metadata=meta)


# -----------------------------------------------------------------------------
# One batch
# -----------------------------------------------------------------------------

class _Batch:
    """Turns a data batch into the training inputs; holds the schedule tables on the device."""

    def __init__(self, model, schedule, spec, dataset, cfg, device):
        self.device, self.schedule, self.conv = device, schedule, spec["time_convention"]
        self.C = model.in_channels
        gamma = getattr(cfg, "min_snr_gamma", None)  # exit-head training has no weighting
        self.gamma = None if gamma is None else float(gamma)
        self.snr = None  # per-sample SNR a^2 / s^2 of the last batch (for the loss weights)
        self.t_range = getattr(cfg, "t_range", None)
        if schedule.kind == "discrete":
            ac = schedule.alphas_cumprod  # float64 [T]
            self.a_tab = ac.sqrt().float().to(device)
            self.s_tab = (1.0 - ac).sqrt().float().to(device)
        # Latent data: precomputed latents are stored unscaled; U-ViT feature folders hold moments
        # (mean, logvar), from which a latent is drawn each step.
        self.latent = bool(spec.get("latent"))
        scale = getattr(dataset, "scale_factor", None)
        if scale is None:
            scale = spec.get("latent_scale", 1.0)
        self.scale = float(scale) if self.latent else 1.0
        ch = getattr(dataset, "channels", self.C)
        self.moments = self.latent and ch == 2 * self.C
        if ch != self.C and not self.moments:
            raise ValueError(f"dataset {cfg.data!r} has {ch} channels but the model takes {self.C}")
        size = getattr(dataset, "img_size", model.img_size)
        if size != model.img_size:
            raise ValueError(f"dataset {cfg.data!r} is {size}x{size} but the model is built for "
                             f"{model.img_size}x{model.img_size}; pick a matching preset or dataset size")
        # Labels.
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        null = getattr(model, "null_class", None)
        self.label_range = _label_range(self.num_classes, null)
        ds_classes = int(getattr(dataset, "num_classes", 0) or 0)
        self.drop_p, self.null = 0.0, null
        if self.num_classes > 0:
            if ds_classes <= 0:
                raise ValueError(f"the model is class-conditional ({self.num_classes} labels) but dataset "
                                 f"{cfg.data!r} has no labels")
            if ds_classes > self.label_range:
                raise ValueError(f"dataset {cfg.data!r} has {ds_classes} classes but the model has room for "
                                 f"{self.label_range} (num_classes={self.num_classes}, null_class={null})")
            builtin = getattr(getattr(model, "y_embedder", None), "dropout_prob", 0.0)
            if builtin > 0:
                pass  # DiT drops labels itself in train mode (class_dropout_prob): do not drop twice
            elif cfg.label_dropout > 0 and null is not None:
                self.drop_p = float(cfg.label_dropout)
            elif cfg.label_dropout > 0:
                warnings.warn("the model has no null class: training without label dropout (no CFG)",
                              stacklevel=3)
        elif ds_classes > 0 and ddist.is_main():
            warnings.warn(f"the model is unconditional: the {ds_classes} dataset labels are ignored",
                          stacklevel=3)

    def __call__(self, x0, y, gen):
        """Returns (x_t, model time, labels or None, eps target), all on the device."""
        dev = self.device
        x0 = x0.to(dev, torch.float32, non_blocking=True)
        B = x0.shape[0]
        if self.schedule.kind == "discrete":
            T = self.schedule.T
            t = torch.randint(0, T, (B,), generator=gen, device=dev)
            if self.t_range is not None:  # extra draws only when asked: runs without it keep their streams
                lo, hi, p = self.t_range
                t_lo = int(lo * T)  # lo < hi <= 1, so t_lo <= T - 1; one index at least when lo, hi are close
                t_hi = max(int(hi * T), t_lo + 1)
                inside = torch.randint(t_lo, t_hi, (B,), generator=gen, device=dev)
                t = torch.where(torch.rand(B, generator=gen, device=dev) < p, inside, t)
            a, s = self.a_tab[t], self.s_tab[t]
        else:
            eps_t = getattr(self.schedule, "eps", 1e-3)
            u = torch.rand(B, generator=gen, device=dev, dtype=torch.float64)
            if self.t_range is not None:
                lo, hi, p = self.t_range
                inside = lo + (hi - lo) * torch.rand(B, generator=gen, device=dev, dtype=torch.float64)
                u = torch.where(torch.rand(B, generator=gen, device=dev) < p, inside, u)
            t = eps_t + (1.0 - eps_t) * u
            a, s = (v.float() for v in self.schedule.alpha_sigma(t))
        if self.moments:
            mean, logvar = x0.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            x0 = mean + std * torch.randn(mean.shape, generator=gen, device=dev)
        x0 = x0 * self.scale
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        xt = a.view(B, 1, 1, 1) * x0 + s.view(B, 1, 1, 1) * eps  # (B, C, H, W)
        self.snr = (a.float() / s.float()).square()
        tm = self.schedule.model_time(t, self.conv).to(torch.float32)
        if self.num_classes > 0:
            y = y.to(dev, torch.long, non_blocking=True)
            if self.drop_p > 0:
                drop = torch.rand(B, generator=gen, device=dev) < self.drop_p
                y = torch.where(drop, torch.full_like(y, self.null), y)
        else:
            y = None
        return xt, tm, y, eps

    def loss(self, pred, eps):
        """MSE on eps; with `min_snr_gamma`, each sample's MSE weighted by min(SNR, gamma) / SNR (Hang et al.
        2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", the eps-prediction form): the
        nearly clean steps, whose eps is hard to guess and barely matters for sampling, stop dominating
        the gradient, and the noisy steps, where the class and the layout are decided, get its weight."""
        if self.gamma is None:
            return F.mse_loss(pred, eps)
        w = self.snr.clamp(max=self.gamma) / self.snr
        return ((pred - eps).square().flatten(1).mean(1) * w).mean()


# -----------------------------------------------------------------------------
# Sample grid
# -----------------------------------------------------------------------------

def _sample_grid(model, schedule, path, n, steps, seed):
    from .data import save_grid
    from .sampling import DuoSampler
    if schedule.kind == "discrete":
        steps = min(steps, schedule.T)
    sampler = DuoSampler(model, model, schedule=schedule, solver="ddim", steps=steps, switch=0)
    x = sampler.sample(n=n, generator=torch.Generator().manual_seed(seed))  # (n, C, H, W)
    if x.shape[1] not in (1, 3):
        return None  # latents: no pixels to show without a VAE
    with _io.atomic_path(path) as tmp:
        save_grid(x, tmp)
    return path


# -----------------------------------------------------------------------------
# Training loop
# -----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training. Returns paths of the outputs and the final loss:
    dict(out, checkpoint, safetensors, spec, log, grids, final_loss, step, copied_from_deep, rank,
    world_size).
    Only rank 0 writes files; `checkpoint` is the newest one written (or resumed from)."""
    from .data import get_dataset
    from .models import create_model, save_safetensors

    with ddist.distributed_session(cfg.device) as (rank, world, device):
        return _train(cfg, rank, world, device, rank == 0, get_dataset, create_model, save_safetensors)


def _prepare_run_folder(cfg, out, main, world):
    """Refuse an occupied run folder unless told to continue (--resume) or start over (--overwrite)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ArgumentError(f"train: out {out!r} exists and is not a folder")
    existing = run_contents(out) if os.path.isdir(out) else []
    if existing and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(
            f"train: {out!r} already holds a training run ({_describe_run(existing, out)}); pass --resume to "
            f"continue it, or --overwrite to delete that run's files and start over (or pick another --out)")
    if main:
        if existing and cfg.overwrite:
            for f in existing:
                os.remove(f)
        _io.check_writable_dir(os.path.join(out, CKPT_DIR), "train --out")
    ddist.barrier()


def _train(cfg, rank, world, device, main, get_dataset, create_model, save_safetensors):
    cfg.validate()
    if cfg.batch_size % world:
        raise ArgumentError(f"batch_size {cfg.batch_size} (global) is not divisible by the {world} processes")
    spec, schedule = _effective_spec(cfg, resolve_spec(cfg.model))
    out, ckpt_dir = os.fspath(cfg.out), os.path.join(os.fspath(cfg.out), CKPT_DIR)
    _prepare_run_folder(cfg, out, main, world)

    # Same initial weights on every rank (DDP also broadcasts rank 0's), then rank-distinct global streams.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = create_model(spec).to(device).train()
    torch.manual_seed(ddist.batch_seed(cfg.seed, 1 + rank))
    random.seed(ddist.batch_seed(cfg.seed, 1 + rank))
    np.random.seed(ddist.batch_seed(cfg.seed, 1 + rank) % 2**32)

    dataset = get_dataset(cfg.data, **cfg.data_kwargs)
    batcher = _Batch(model, schedule, spec, dataset, cfg, device)

    copied = None
    resume_path, ck = None, None
    if cfg.resume:
        where = out if cfg.resume in ("latest", "auto") else os.fspath(cfg.resume)
        try:
            resume_path, ck = load_intact_checkpoint(where, warn=main)
        except FileNotFoundError:
            if cfg.resume not in ("latest", "auto"):
                raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint found") from None
            if main:
                warnings.warn(f"--resume: no checkpoint in {out}: starting from step 0", stacklevel=2)
        if ck is not None and ck.get("spec") is not None:
            old = {k: v for k, v in ck["spec"].items() if k != "preset"}
            new = {k: v for k, v in spec.items() if k != "preset"}
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ArgumentError(f"--resume {resume_path}: that run trained another model (spec differs in "
                                    f"{', '.join(diff)}); resume with the same --model, or start a new --out")
    if cfg.init_from_deep and resume_path is None:
        copied = len(init_from_deep(model, cfg.init_from_deep)["copied"])

    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(5000, cfg.steps // 10)
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, cfg.steps, min_ratio))

    start, rng_states = 0, None
    if resume_path is not None:
        model.load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        ema.load_state_dict(ck["ema_state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["step"])
        old = ck.get("config", {})
        for key in ("steps", "batch_size", "seed", "t_range"):  # t_range: a validated tuple on both sides
            if key in old and old[key] != getattr(cfg, key) and main:
                warnings.warn(f"resuming {resume_path} with {key}={getattr(cfg, key)} (it was trained with "
                              f"{old[key]}): the run will not match an uninterrupted one", stacklevel=2)
        rng_states = ck.get("rng")
        if rng_states is not None and len(rng_states) != world:
            if main:
                warnings.warn(f"checkpoint written by {len(rng_states)} processes, resuming with {world}: "
                              "global RNG streams are not restored", stacklevel=2)
            rng_states = None

    ddp = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    end = cfg.steps if cfg.stop_at is None else max(start, min(cfg.steps, int(cfg.stop_at)))
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, start, end)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)  # before restoring RNG: creating the iterator draws from the global generator
    if rng_states is not None:
        _set_rng_state(rng_states[rank], device)

    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    gen = torch.Generator(device=device)

    paths = dict(out=out, spec=os.path.join(out, "model.json"), log=os.path.join(out, "log.jsonl"),
                 safetensors=os.path.join(out, "ema.safetensors"), checkpoint=resume_path, grids=[])
    # Checkpoints this run may prune: the ones it resumed from (its own history) and the ones it writes.
    own_ckpts = [c for c in list_checkpoints(out) if resume_path is not None
                 and int(_CKPT_NAME.fullmatch(os.path.basename(c)).group(1)) <= start]
    if main:
        _io.write_json(paths["spec"], spec)
        _io.write_json(os.path.join(out, "config.json"),
                       dict(cfg.to_dict(), world_size=world, precision=precision, warmup_steps=warmup,
                            effective_spec=spec, copied_from_deep=copied))
        if resume_path is not None:
            # Log lines past the checkpoint come from steps about to be redone: drop them.
            _truncate_log(paths["log"], start)
            if not _export_ok(paths["safetensors"], start):
                # Missing, truncated or stale export of a resumed run: rewrite it from the checkpoint.
                _export_ema(ema.model, paths["safetensors"], spec, start, cfg.data)

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    window, final_loss, t_window = 0, float("nan"), time.perf_counter()
    grad_norm = torch.zeros((), device=device)

    def save_checkpoint(step):
        rng = _gather_rng(device, world)  # collective: every rank calls it
        if not main:
            return
        path = os.path.join(ckpt_dir, CKPT_FORMAT.format(step=step))
        _atomic_torch_save(dict(step=step, model=model.state_dict(), ema=ema.model.state_dict(),
                                ema_state=ema.state_dict(), optimizer=opt.state_dict(),
                                scheduler=sched.state_dict(), rng=rng, world_size=world, config=cfg.to_dict(),
                                spec=spec), path)
        if path not in own_ckpts:
            own_ckpts.append(path)
        _prune(own_ckpts, cfg.keep_checkpoints)
        _export_ema(ema.model, paths["safetensors"], spec, step, cfg.data)
        paths["checkpoint"] = path

    log_mode = "a" if resume_path is not None else "w"  # a fresh run does not extend an old log
    with open(paths["log"], log_mode) if main else open(os.devnull, "w") as log:
        for step in range(start, end):
            x0, y = next(batches)
            gen.manual_seed(_step_seed(cfg.seed, rank, step))
            xt, tm, y, eps = batcher(x0, y, gen)
            with torch.autocast(**amp):
                out_ = ddp(xt, tm, y) if y is not None else ddp(xt, tm)
            # Only the eps channels: DiT's learned-sigma channels are not trained (DDIM/DDPM ignore them).
            loss = batcher.loss(out_[:, : batcher.C].float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            ema.update(model)
            loss_sum += loss.detach()
            window += 1
            s = step + 1
            bar.update(1)

            if s % cfg.log_every == 0 or s == end:
                mean = loss_sum / window
                if world > 1:
                    torch.distributed.all_reduce(mean)
                    mean = mean / world
                final_loss = float(mean.item())
                now = time.perf_counter()
                rec = dict(step=s, loss=final_loss, lr=opt.param_groups[0]["lr"], grad_norm=float(grad_norm),
                           images_per_s=window * cfg.batch_size / max(now - t_window, 1e-9))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{rec['lr']:.2e}")
                loss_sum.zero_()
                window, t_window = 0, now
                if not math.isfinite(final_loss):
                    raise FloatingPointError(f"loss is {final_loss} at step {s}; lower the lr or check "
                                             "the data")
            if cfg.ckpt_every and s % cfg.ckpt_every == 0 and s != end:
                save_checkpoint(s)
            if main and cfg.sample_every and (s % cfg.sample_every == 0 or s == end):
                p = os.path.join(out, "samples", f"step_{s:07d}.png")
                if _sample_grid(ema.model, schedule, p, cfg.sample_n, cfg.sample_steps, cfg.seed):
                    paths["grids"].append(p)
        bar.close()
        if end > start:
            save_checkpoint(end)
    ddist.barrier()
    return dict(paths, final_loss=final_loss, step=end, copied_from_deep=copied, rank=rank, world_size=world)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def cmd_train(args) -> int:
    cfg = TrainConfig(
        model=args.model, data=args.data,
        data_kwargs=json.loads(args.data_kwargs) if args.data_kwargs else {},
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, betas=tuple(args.betas),
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, label_dropout=args.label_dropout, min_snr_gamma=args.min_snr_gamma,
        t_range=args.t_range, schedule=args.schedule,
        time_convention=args.time_convention, precision=args.precision, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite,
        init_from_deep=args.init_from_deep, stop_at=args.stop_at, ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints, sample_every=args.sample_every, sample_n=args.sample_n,
        sample_steps=args.sample_steps, log_every=args.log_every, num_workers=args.num_workers,
        device=args.device, progress=not args.no_progress)
    res = train(cfg)
    if res["rank"] == 0:
        print(f"step {res['step']}: loss {res['final_loss']:.4f}; wrote {res['checkpoint']} and "
              f"{res['safetensors']}")
    return 0


def add_cli(subparsers):
    """Add the `train` subcommand to the `duodiff-fast` parser."""
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a deep or shallow denoiser (DuoDiff recipe, torchrun)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="preset name (duodiff-fast info --presets) or a JSON spec file")
    p.add_argument("--data", default=d.data,
                   help="dataset: shapes[:SIZE], cifar10:PATH, folder:PATH, npz:PATH, latents:PATH")
    p.add_argument("--data-kwargs", default=None, help='JSON of extra dataset keywords, e.g. \'{"n": 1000}\'')
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(5000, steps // 10)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--betas", type=lambda v: [float(b) for b in v.split(",")], default=list(d.betas),
                   help="AdamW betas, e.g. 0.9,0.999 (DuoDiff: 0.99,0.999)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout)
    p.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma,
                   help="weight each sample's eps MSE by min(SNR, gamma) / SNR (Min-SNR-gamma, e.g. 5; "
                        "default: plain MSE, the DuoDiff recipe)")
    p.add_argument("--t-range", default=None, metavar="LO,HI[,P]",
                   help="draw the training timestep from the fractions [LO, HI] of the diffusion time (1 = pure "
                        "noise) with probability P (default 1), else from the whole range: a shallow companion "
                        "trained on the noisy steps it samples, e.g. 0.4,1.0,0.8")
    p.add_argument("--schedule", default=None,
                   help="training schedule (default: the model's discrete one, else linear)")
    p.add_argument("--time-convention", default=None, choices=list(TIME_CONVENTIONS))
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from PATH (file or run folder), or with no PATH from the newest "
                        "checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="--out already holds a run: delete that run's files (checkpoints, export, log, "
                        "grids) and start over; without it (or --resume) an occupied --out is refused")
    p.add_argument("--init-from-deep", default=None, metavar="PATH",
                   help="initialise a shallow model from a trained deep checkpoint (mapped blocks, "
                        "embeddings, head)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (the schedule still spans --steps)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--sample-n", type=int, default=d.sample_n)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)
    return p

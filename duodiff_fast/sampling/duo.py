"""DuoSampler: a shallow network for the first (noisiest) steps, a deep one for the rest.

DuoDiff (arXiv 2410.09633) observed that early-exit diffusion transformers barely use their depth
in the first sampling steps and then suddenly need all of it. Running a 3-block companion for the
first `k` of `N` steps and the full model afterwards costs `(3k + D(N-k)) / (D N)` of deep-only
sampling, with no data-dependent control flow (so batches and graphs stay simple).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .schedules import Schedule, get_schedule
from .solvers import get_solver


# -----------------------------------------------------------------------------
# Switch point
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AtTimestep:
    """Switch at an absolute schedule time: the shallow model runs every step with `t >= value`.

    For discrete schedules `value` is an integer timestep in [0, T); for the continuous VP-SDE it
    is a time in (0, 1].
    """
    value: float


def shallow_steps(switch, timesteps: torch.Tensor) -> int:
    """Number of leading steps given to the shallow model.

    `switch` is a fraction of the steps in [0, 1] (a float, or the ints 0 and 1), an `AtTimestep`,
    or an int > 1, read as an absolute discrete timestep.
    """
    steps = len(timesteps)
    if isinstance(switch, bool):
        raise TypeError("switch must be a fraction in [0, 1] or an absolute timestep, not a bool")
    if isinstance(switch, int) and switch > 1:
        switch = AtTimestep(switch)
    if isinstance(switch, AtTimestep):
        return int((timesteps.double() >= float(switch.value)).sum())
    if isinstance(switch, (int, float)):
        if not 0.0 <= float(switch) <= 1.0:
            raise ValueError(f"switch as a fraction of steps must lie in [0, 1], got {switch}; "
                             "use AtTimestep(t) for an absolute timestep")
        return int(round(float(switch) * steps))
    raise TypeError(f"switch must be a float fraction, an int timestep or AtTimestep, got {type(switch).__name__}")


# -----------------------------------------------------------------------------
# Trace
# -----------------------------------------------------------------------------

@dataclass
class SampleTrace:
    """What ran in the last `sample()` call: the model per step and the seconds per segment."""
    models: list = field(default_factory=list)       # 'shallow' | 'deep' per step
    timesteps: list = field(default_factory=list)    # schedule time per step
    seconds: dict = field(default_factory=dict)      # {'shallow': s, 'deep': s}
    total_seconds: float = 0.0

    @property
    def shallow_steps(self) -> int:
        return sum(m == "shallow" for m in self.models)


# -----------------------------------------------------------------------------
# Sampler
# -----------------------------------------------------------------------------

def _model_info(m):
    return dict(
        img_size=getattr(m, "img_size", None),
        in_channels=getattr(m, "in_channels", None),
        num_classes=getattr(m, "num_classes", 0) or 0,
        time_convention=getattr(m, "time_convention", None),
    )


def _params_of(model):
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("DuoSampler: the model has no parameters, cannot tell its device/dtype")
    return p


class DuoSampler:
    """Sample with `shallow` for the first steps and `deep` for the rest.

    Args:
        shallow, deep: denoisers `f(x, t, y=None) -> eps` (U-ViT / DiT from `duodiff_fast.models`,
            or any module with `img_size`, `in_channels`, `num_classes`, `time_convention`).
            `DuoSampler(deep, deep, ...)` or `switch=0` is plain deep sampling.
        schedule: a `Schedule`, a name ('linear', 'scaled_linear', 'cosine', 'vpsde') or a dict;
            defaults to the deep model's `schedule_spec` when it has one.
        solver: 'ddim' (default), 'ddpm' or 'dpmsolver++'.
        steps: number of sampling steps.
        switch: fraction of steps given to the shallow model (0 = deep only, 1 = shallow only),
            or `AtTimestep(t)` / an int > 1 for an absolute timestep.
        cfg_scale: classifier-free guidance scale for class-conditional models (None or 1 = off).
        cuda_graphs: 'auto' or False. This version samples eagerly; graph capture of the two
            segments is planned (DESIGN.md §4).
        dtype: dtype the networks run in (default: the deep model's parameter dtype). The solver
            state stays float32.
        spacing: timestep spacing ('leading', 'trailing', 'linspace'); solver default if None.
        eta: DDIM eta.
        clip_sample: clamp each step's x0 prediction to [-c, c] ('ddim' and 'ddpm'), as the original
            DDPM sampler does for pixel models; None (default) leaves it free.
        progress: show a progress bar over the steps.
    """

    def __init__(self, shallow, deep, *, schedule=None, solver="ddim", steps=50, switch=0.3,
                 cfg_scale=None, cuda_graphs="auto", dtype=None, spacing=None, eta=0.0, clip_sample=None,
                 progress=False):
        a, b = _model_info(shallow), _model_info(deep)
        for key in ("img_size", "in_channels", "num_classes", "time_convention"):
            if a[key] != b[key]:
                raise ValueError(f"DuoSampler: shallow and deep models disagree on {key}: "
                                 f"shallow has {a[key]!r}, deep has {b[key]!r}")
        if a["img_size"] is None or a["in_channels"] is None:
            raise ValueError("DuoSampler: models must expose img_size and in_channels")
        if cuda_graphs not in ("auto", False, None):
            raise ValueError(f"DuoSampler: cuda_graphs={cuda_graphs!r} is not available in this version "
                             "(use 'auto' or False; sampling runs eagerly)")
        if schedule is None:
            schedule = getattr(deep, "schedule_spec", None)
            if schedule is None:
                raise ValueError("DuoSampler: pass schedule= (the deep model carries no schedule_spec)")
        self.schedule: Schedule = schedule if isinstance(schedule, Schedule) else get_schedule(schedule)
        self.shallow, self.deep = shallow, deep
        self.img_size, self.in_channels = a["img_size"], a["in_channels"]
        self.num_classes = a["num_classes"]
        self.time_convention = a["time_convention"] or "int"
        self.steps = int(steps)
        kw = {} if spacing is None else {"spacing": spacing}
        if solver == "ddim":
            kw["eta"] = eta
        if clip_sample is not None:
            if solver not in ("ddim", "ddpm"):
                raise ValueError(f"DuoSampler: clip_sample works with 'ddim' and 'ddpm', not {solver!r}")
            kw["clip_sample"] = float(clip_sample)
        self.solver_name = solver
        self.solver = get_solver(solver, self.schedule, self.steps, **kw)
        self.switch = switch
        self.k = shallow_steps(switch, self.solver.timesteps)
        if cfg_scale is not None and cfg_scale != 1.0:
            if self.num_classes <= 0:
                raise ValueError("DuoSampler: cfg_scale needs a class-conditional model (num_classes > 0)")
            for name, m in (("shallow", shallow), ("deep", deep)):
                if getattr(m, "null_class", None) is None:
                    raise ValueError(f"DuoSampler: the {name} model has no null_class for guidance")
        self.cfg_scale = cfg_scale
        p = _params_of(deep)
        self.device = p.device
        self.dtype = dtype or p.dtype
        for name, m in (("shallow", shallow), ("deep", deep)):
            q = _params_of(m)
            if q.device != self.device:
                raise ValueError(f"DuoSampler: {name} model is on {q.device}, deep model on {self.device}")
            if q.dtype != self.dtype:
                raise ValueError(f"DuoSampler: {name} model parameters are {q.dtype} but dtype={self.dtype}; "
                                 f"convert it first (model.to({self.dtype}))")
        self.solver.to(self.device)
        self.progress = progress
        self.trace = SampleTrace()

    # ---- one network evaluation -------------------------------------------------------------
    def _eps(self, model, x, t, y):
        B = x.shape[0]
        tm = self.schedule.model_time(t.reshape(1), self.time_convention).to(self.device)
        tm = tm.to(torch.float32).expand(B)
        xin = x.to(self.dtype)
        guided = self.cfg_scale is not None and self.cfg_scale != 1.0
        if guided:
            null = torch.full_like(y, model.null_class)
            out = model(torch.cat([xin, xin]), torch.cat([tm, tm]), torch.cat([y, null]))
            out = out[:, : self.in_channels].float()
            cond, uncond = out.chunk(2)
            return uncond + self.cfg_scale * (cond - uncond)
        out = model(xin, tm, y) if y is not None else model(xin, tm)
        return out[:, : self.in_channels].float()

    # ---- inputs --------------------------------------------------------------------------------
    def _inputs(self, n, noise, y, generator):
        shape = (self.in_channels, self.img_size, self.img_size)
        if noise is not None:
            if noise.dim() != 4 or tuple(noise.shape[1:]) != shape:
                raise ValueError(f"DuoSampler.sample: noise must be [n, {shape[0]}, {shape[1]}, {shape[2]}], "
                                 f"got {tuple(noise.shape)}")
            if n is not None and n != noise.shape[0]:
                raise ValueError(f"DuoSampler.sample: n={n} but noise has {noise.shape[0]} samples")
            if not noise.is_floating_point():
                raise ValueError(f"DuoSampler.sample: noise must be floating point, got {noise.dtype}")
            n = noise.shape[0]
            x = noise.to(self.device, torch.float32)
        else:
            if n is None or int(n) < 1:
                raise ValueError(f"DuoSampler.sample: give n >= 1 or a noise tensor (got n={n})")
            n = int(n)
            x = self._randn((n, *shape), generator)
        if self.num_classes > 0:
            if y is None:
                gdev = generator.device if generator is not None else self.device
                y = torch.randint(0, self.label_range(), (n,), generator=generator, device=gdev)
            y = torch.as_tensor(y)
            if y.dim() != 1 or y.shape[0] != n:
                raise ValueError(f"DuoSampler.sample: y must be a 1-D tensor of {n} labels, got shape {tuple(y.shape)}")
            if y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"DuoSampler.sample: y must hold integer class labels, got {y.dtype}")
            if n and (int(y.min()) < 0 or int(y.max()) >= self.label_range()):
                raise ValueError(f"DuoSampler.sample: labels must lie in [0, {self.label_range()}), "
                                 f"got min {int(y.min())} max {int(y.max())}")
            y = y.to(self.device, torch.long)
        elif y is not None:
            raise ValueError("DuoSampler.sample: y was given but the models are unconditional (num_classes=0)")
        return x, y

    def label_range(self) -> int:
        """Real class labels are [0, label_range): the null class of guidance is not one of them."""
        # U-ViT's ImageNet models reserve their last class as the "no label" class for guidance.
        null = getattr(self.deep, "null_class", None)
        return null if null is not None and null < self.num_classes else self.num_classes

    def _randn(self, shape, generator):
        gdev = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- sampling ------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, n=None, noise=None, y=None, generator=None):
        """Draw samples. Returns `[n, C, H, W]` float32 (model space: pixels in [-1, 1] or latents).

        Deterministic given `generator` (or `noise` plus `y` for deterministic solvers).
        """
        x, y = self._inputs(n, noise, y, generator)
        timesteps = self.solver.timesteps
        state = self.solver.init_state(x)
        trace = SampleTrace(seconds={"shallow": 0.0, "deep": 0.0})
        steps = range(len(timesteps))
        if self.progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", unit="step", leave=False)
        self._sync()
        t_start = seg_start = time.perf_counter()
        for i in steps:
            name = "shallow" if i < self.k else "deep"
            if i == self.k and i > 0:  # segment boundary: close the shallow segment's clock
                self._sync()
                now = time.perf_counter()
                trace.seconds["shallow"] += now - seg_start
                seg_start = now
            model = self.shallow if name == "shallow" else self.deep
            t = timesteps[i]
            eps = self._eps(model, x, t, y)
            step_noise = self._randn(x.shape, generator) if self.solver.needs_noise(i) else None
            x = self.solver.step(state, i, x, eps, noise=step_noise)
            trace.models.append(name)
            trace.timesteps.append(float(t))
        self._sync()
        end = time.perf_counter()
        trace.seconds["deep" if self.k < len(timesteps) else "shallow"] += end - seg_start
        trace.total_seconds = end - t_start
        self.trace = trace
        return x

    def compute_fraction(self) -> float:
        """Fraction of deep-only compute this sampler spends, counting transformer blocks (DESIGN §2)."""
        ds = getattr(self.shallow, "depth_blocks", None)
        dd = getattr(self.deep, "depth_blocks", None)
        if ds is None or dd is None:
            raise ValueError("compute_fraction needs models with depth_blocks")
        n = self.steps
        return (ds * self.k + dd * (n - self.k)) / (dd * n)

    def __repr__(self):
        return (f"DuoSampler(solver={self.solver_name}, steps={self.steps}, shallow_steps={self.k}, "
                f"schedule={self.schedule.name}, cfg_scale={self.cfg_scale}, dtype={self.dtype})")

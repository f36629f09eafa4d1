"""DuoSampler: a shallow network for the first (noisiest) steps, a deep one for the rest.

DuoDiff (arXiv 2410.09633) observed that early-exit diffusion transformers barely use their depth
in the first sampling steps and then suddenly need all of it. Running a 3-block companion for the
first `k` of `N` steps and the full model afterwards costs `(3k + D(N-k)) / (D N)` of deep-only
sampling, with no data-dependent control flow (so batches and graphs stay simple).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._validate import ArgumentError, check_float, check_int, describe
from ..conventions import label_range as _label_range
from .schedules import Schedule, get_schedule
from .segments import Denoiser, draw_step_noise, guides, plan_segments, run_segment
from .solvers import get_solver, solver_name


# -----------------------------------------------------------------------------
# Switch point
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AtTimestep:
    """Switch at an absolute schedule time: the shallow model runs every step with `t >= value`.

    For discrete schedules `value` is a timestep in [0, T] (T: no step is shallow); for the continuous
    VP-SDE it is a time in [0, 1]. Values outside the schedule's range are refused by the sampler.
    """
    value: float

    def __post_init__(self):
        object.__setattr__(self, "value", check_float(self.value, "AtTimestep value"))


def shallow_steps(switch, timesteps: torch.Tensor, schedule: Schedule | None = None) -> int:
    """Number of leading steps given to the shallow model.

    `switch` is a fraction of the steps in [0, 1] (a float, or the ints 0 and 1), an `AtTimestep`,
    or an int > 1, read as an absolute discrete timestep. With `schedule`, an absolute timestep must lie
    in its range ([0, T] discrete, [0, 1] continuous).
    """
    steps = len(timesteps)
    if isinstance(switch, (bool, np.bool_)):
        raise ArgumentError("switch must be a fraction in [0, 1] or an absolute timestep, not a bool")
    if isinstance(switch, (np.integer, np.floating)):
        switch = switch.item()
    if isinstance(switch, int) and switch > 1:
        switch = AtTimestep(switch)
    if isinstance(switch, AtTimestep):
        value = switch.value
        if schedule is not None:
            hi = schedule.T
            if not 0 <= value <= hi:
                what = (f"an integer timestep in [0, {hi}]" if schedule.kind == "discrete"
                        else f"a time in [0, {hi:g}] (continuous schedule)")
                raise ArgumentError(f"switch AtTimestep({value:g}) is outside the {schedule.name!r} schedule: "
                                    f"use {what}, or a fraction of the steps in [0, 1]")
        return int((timesteps.double().cpu() >= value).sum())
    if isinstance(switch, (int, float)):
        f = check_float(switch, "switch")
        if not 0.0 <= f <= 1.0:
            raise ArgumentError(f"switch as a fraction of steps must lie in [0, 1], got {switch}; "
                                "use AtTimestep(t) for an absolute timestep")
        return int(round(f * steps))
    raise ArgumentError(f"switch must be a float fraction, an int timestep or AtTimestep, got {describe(switch)}")


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
    graphs: bool = False                             # whether CUDA-graph replay ran the segments

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


def _params_of(model, name):
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"DuoSampler: the {name} model must be a torch.nn.Module, got {describe(model)}")
    p = next(model.parameters(), None)
    if p is None:
        raise ArgumentError(f"DuoSampler: the {name} model has no parameters, cannot tell its device/dtype")
    return p


def _normalise_schedule_spec(spec):
    if spec is None:
        return None
    try:
        return get_schedule(spec)
    except (ValueError, TypeError):
        return None


def _same_schedule(a, b) -> bool:
    """Whether two schedules give the same alphas (by their tables, not their spelling)."""
    if a.kind != b.kind or a.T != b.T or getattr(a, "t_offset", 0) != getattr(b, "t_offset", 0):
        return False
    if a.kind == "discrete":
        return torch.allclose(a.alphas_cumprod, b.alphas_cumprod, rtol=1e-9, atol=0)
    return (a.beta_min, a.beta_max) == (b.beta_min, b.beta_max)


class DuoSampler:
    """Sample with `shallow` for the first steps and `deep` for the rest.

    Args:
        shallow, deep: denoisers `f(x, t, y=None) -> eps` (U-ViT / DiT from `duodiff_fast.models`,
            or any module with `img_size`, `in_channels`, `num_classes`, `time_convention`).
            `DuoSampler(deep, deep, ...)` or `switch=0` is plain deep sampling.
        schedule: a `Schedule`, a name ('linear', 'scaled_linear', 'cosine', 'vpsde') or a dict;
            defaults to the deep model's `schedule_spec` when it has one.
        solver: 'ddim' (default), 'ddpm' or 'dpmsolver++' (any case; 'dpm++3m' for third order), or a
            diffusers scheduler instance (UniPC, Euler, Heun, DPM-Solver variants, ...), run eagerly with its
            own set_timesteps/step loop (`diffusers_loop.py`; `switch` then counts solver steps).
        steps: number of sampling steps (a positive integer).
        switch: fraction of steps given to the shallow model (0 = deep only, 1 = shallow only),
            or `AtTimestep(t)` / an int > 1 for an absolute timestep inside the schedule's range.
        cfg_scale: classifier-free guidance in diffusers' convention, `uncond + w (cond - uncond)`:
            None or 1 = off, 0 = unconditional; a finite number >= 0. (Upstream U-ViT writes
            `cond + s (cond - uncond)`: its s is w - 1.) Presets carry a recommended value
            (`model.recommended_cfg_scale`); pass `cfg_scale="preset"` to use it.
        shallow_cfg_scale: guidance for the shallow steps only (same convention); None (default) =
            `cfg_scale`. The deep steps always use `cfg_scale`. 1 runs the shallow steps unguided (one
            forward per step instead of two). On the demo pair lower guidance on the noisy steps
            improved proxy FID and class accuracy, for the deep model alone as much as for DuoDiff (README,
            'Guidance of the shallow steps').
        cfg_channels: how many leading eps channels guidance applies to; the rest keep the conditional
            prediction. Default: the deep model's `cfg_channels` (DiT: 3, as its official
            `forward_with_cfg`; U-ViT: all), None = all.
        cuda_graphs: 'auto' (graphs on CUDA, eager elsewhere), True (graphs; an error off CUDA) or False.
            Graphs capture the shallow and the deep segment separately per batch bucket (a power of two up
            to `graph_max_bucket`; see `graphs.py`); `graph_mode` 'segment' (one graph per segment) or
            'step' (one graph per segment's step, replayed per step). `release_graphs()` frees them.
        dtype: dtype the networks run in (default: the deep model's parameter dtype). The solver
            state stays float32.
        spacing: timestep spacing ('leading', 'trailing', 'linspace'); solver default if None.
        eta: DDIM eta in [0, 1] (only 'ddim' takes it; other solvers refuse a nonzero eta).
        clip_sample: clamp each step's x0 prediction to [-c, c] ('ddim' and 'ddpm'), as the original
            DDPM sampler does for pixel models; None (default) leaves it free.
        progress: show a progress bar over the steps.

    Sampling is built from segments (`segments.py`): shallow for steps [0, k), deep for [k, N), each run
    by one function with device-resident timesteps and noise drawn before the loop.
    """

    def __init__(self, shallow, deep, *, schedule=None, solver="ddim", steps=50, switch=0.3,
                 cfg_scale=None, shallow_cfg_scale=None, cfg_channels="auto", cuda_graphs="auto", dtype=None,
                 spacing=None, eta=0.0, clip_sample=None, progress=False, graph_mode="segment",
                 graph_max_bucket=128):
        p_deep = _params_of(deep, "deep")
        p_shallow = _params_of(shallow, "shallow")
        a, b = _model_info(shallow), _model_info(deep)
        for key in ("img_size", "in_channels", "num_classes", "time_convention"):
            if a[key] != b[key]:
                raise ArgumentError(f"DuoSampler: shallow and deep models disagree on {key}: "
                                    f"shallow has {a[key]!r}, deep has {b[key]!r}")
        if a["img_size"] is None or a["in_channels"] is None:
            raise ArgumentError("DuoSampler: models must expose img_size and in_channels")
        null_s, null_d = getattr(shallow, "null_class", None), getattr(deep, "null_class", None)
        if null_s != null_d:
            raise ArgumentError(f"DuoSampler: shallow and deep models disagree on null_class (the label of "
                                f"the unconditional branch): shallow has {null_s!r}, deep has {null_d!r}")
        spec_s = _normalise_schedule_spec(getattr(shallow, "schedule_spec", None))
        spec_d = _normalise_schedule_spec(getattr(deep, "schedule_spec", None))
        if spec_s is not None and spec_d is not None and not _same_schedule(spec_s, spec_d):
            raise ArgumentError(f"DuoSampler: shallow and deep models were trained on different noise "
                                f"schedules: shallow {getattr(shallow, 'schedule_spec')}, deep "
                                f"{getattr(deep, 'schedule_spec')}")
        if cuda_graphs not in ("auto", True, False, None):
            raise ArgumentError(f"DuoSampler: cuda_graphs must be 'auto', True or False, got "
                                f"{describe(cuda_graphs)}")
        if schedule is None:
            schedule = getattr(deep, "schedule_spec", None)
            if schedule is None:
                raise ArgumentError("DuoSampler: pass schedule= (the deep model carries no schedule_spec)")
        self.schedule: Schedule = schedule if isinstance(schedule, Schedule) else get_schedule(schedule)
        self.shallow, self.deep = shallow, deep
        self.img_size, self.in_channels = a["img_size"], a["in_channels"]
        self.num_classes = a["num_classes"]
        self.time_convention = a["time_convention"] or "int"
        self.steps = check_int(steps, "steps", minimum=1, where="DuoSampler")
        eta = check_float(eta, "eta", minimum=0.0, where="DuoSampler")
        self.switch = switch
        self.scheduler = None  # a diffusers scheduler instance, when one is the solver
        from .diffusers_loop import is_scheduler
        if is_scheduler(solver):
            self._init_scheduler(solver, shallow, deep, spacing, eta, clip_sample, cuda_graphs)
        else:
            self._init_solver(solver, spacing, eta, clip_sample)
        self.cfg_scale = self._check_cfg(cfg_scale, "cfg_scale", shallow, deep)
        self.shallow_cfg_scale = (self.cfg_scale if shallow_cfg_scale is None else
                                  self._check_cfg(shallow_cfg_scale, "shallow_cfg_scale", shallow, deep))
        # Labels are doubled with the null class once per run when any segment guides (an unguided one
        # then reads the first half): one label layout for every segment and every captured graph.
        self.guided = guides(self.cfg_scale) or guides(self.shallow_cfg_scale)
        self.cfg_channels = self._check_cfg_channels(cfg_channels, deep)
        self.device = p_deep.device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentError(f"DuoSampler: dtype must be a floating torch.dtype, got {describe(dtype)}")
        self.dtype = dtype or p_deep.dtype
        for name, q in (("shallow", p_shallow), ("deep", p_deep)):
            if q.device != self.device:
                raise ArgumentError(f"DuoSampler: {name} model is on {q.device}, deep model on {self.device}")
            if q.dtype != self.dtype:
                raise ArgumentError(f"DuoSampler: {name} model parameters are {q.dtype} but dtype={self.dtype}; "
                                    f"convert it first (model.to({self.dtype}))")
        if cuda_graphs is True and self.device.type != "cuda":
            raise ArgumentError(f"DuoSampler: cuda_graphs=True needs CUDA models; these are on {self.device} "
                                "(use cuda_graphs='auto' or False)")
        self.cuda_graphs = cuda_graphs
        from .graphs import MODES
        from .._validate import check_choice
        self.graph_mode = check_choice(graph_mode, "graph_mode", MODES, where="DuoSampler")
        self.graph_max_bucket = check_int(graph_max_bucket, "graph_max_bucket", minimum=1, where="DuoSampler")
        self._runner = None
        if not isinstance(progress, (bool, np.bool_)):
            raise ArgumentError(f"DuoSampler: progress must be True or False, got {describe(progress)}")
        self.progress = bool(progress)
        if self.solver is not None:
            self.solver.to(self.device)
            # Everything the loop indexes per step lives on the device from here on (segments.py).
            self._model_times = self.schedule.model_time(self.solver.timesteps, self.time_convention).to(
                device=self.device, dtype=torch.float32)
            self._timesteps_host = [float(t) for t in self.solver.timesteps.cpu()]
            self.segments = plan_segments({"shallow": shallow, "deep": deep}, self.k, self.steps)
        else:
            self._model_times, self.segments = None, []
            self._timesteps_host = list(self.scheduler_plan.timesteps)
        self.trace = SampleTrace()

    # ---- constructor helpers ---------------------------------------------------------------------
    def _init_solver(self, solver, spacing, eta, clip_sample):
        """One of the library's solvers (graph-capturable: precomputed coefficients, pre-drawn noise)."""
        self.solver_name = solver_name(solver)
        kw = {} if spacing is None else {"spacing": spacing}
        if self.solver_name == "ddim":
            kw["eta"] = eta
        elif eta != 0.0:
            raise ArgumentError(f"DuoSampler: eta={eta:g} has no meaning for solver {self.solver_name!r} "
                                "(only 'ddim' takes eta; DDPM is always stochastic, DPM-Solver++ deterministic)")
        if clip_sample is not None:
            if self.solver_name not in ("ddim", "ddpm"):
                raise ArgumentError(f"DuoSampler: clip_sample works with 'ddim' and 'ddpm', not "
                                    f"{self.solver_name!r}")
            kw["clip_sample"] = check_float(clip_sample, "clip_sample", minimum=0.0, exclusive_minimum=True,
                                            where="DuoSampler")
        self.solver = get_solver(self.solver_name, self.schedule, self.steps, **kw)
        # The model time convention must fit the schedule (checked once here, not per step).
        self.schedule.model_time(self.solver.timesteps[:1], self.time_convention)
        self.k = shallow_steps(self.switch, self.solver.timesteps, self.schedule)

    def _init_scheduler(self, scheduler, shallow, deep, spacing, eta, clip_sample, cuda_graphs):
        """A diffusers scheduler instance as the solver: its own set_timesteps/step loop, eager only (its
        `step` keeps Python state and draws noise inside, which a CUDA graph cannot hold)."""
        from .diffusers_loop import _accepts, plan_scheduler
        name = type(scheduler).__name__
        if cuda_graphs is True:
            raise ArgumentError(f"DuoSampler: cuda_graphs=True works with the library's own solvers only; "
                                f"a diffusers scheduler ({name}) runs eagerly")
        for arg, value in (("spacing", spacing), ("clip_sample", clip_sample)):
            if value is not None:
                raise ArgumentError(f"DuoSampler: {arg}={value!r} is set in the {name}'s own config, not here")
        if eta and not _accepts(scheduler.step, "eta"):
            raise ArgumentError(f"DuoSampler: eta={eta:g} but {name}.step takes no eta")
        self._step_kwargs = {"eta": eta} if eta else None
        self.schedule.model_time(torch.zeros(1), self.time_convention)
        learned = bool(getattr(deep, "learn_sigma", False) and getattr(shallow, "learn_sigma", False))
        self.scheduler_plan = plan_scheduler(scheduler, self.steps, self.switch, schedule=self.schedule,
                                             learned_sigma=learned, step_kwargs=self._step_kwargs)
        self.scheduler = scheduler
        self.solver, self.solver_name = None, name
        self.k = self.scheduler_plan.k  # solver steps (Heun / KDPM2: two evaluations each) on shallow

    def _check_cfg(self, cfg_scale, name, shallow, deep):
        if isinstance(cfg_scale, str) and cfg_scale == "preset" and name == "cfg_scale":
            cfg_scale = getattr(deep, "recommended_cfg_scale", None)
            if cfg_scale is None:
                raise ArgumentError("DuoSampler: cfg_scale='preset' but the deep model's preset recommends no "
                                    "guidance scale; pass a number")
        if cfg_scale is None:
            return None
        w = check_float(cfg_scale, name, minimum=0.0, where="DuoSampler")
        if w == 1.0:
            return w  # guidance with w = 1 is the conditional prediction: no doubled batch needed
        if self.num_classes <= 0:
            raise ArgumentError(f"DuoSampler: {name}={w:g} needs a class-conditional model (num_classes > 0)")
        for which, m in (("shallow", shallow), ("deep", deep)):
            if getattr(m, "null_class", None) is None:
                raise ArgumentError(f"DuoSampler: {name}={w:g} but the {which} model has no null_class "
                                    "(it was trained without label dropout, so it has no unconditional branch)")
        return w

    def _check_cfg_channels(self, cfg_channels, deep):
        if isinstance(cfg_channels, str) and cfg_channels == "auto":
            cfg_channels = getattr(deep, "cfg_channels", None)
            return None if cfg_channels is None else min(int(cfg_channels), self.in_channels)
        if cfg_channels is None:
            return None
        return check_int(cfg_channels, "cfg_channels", minimum=1, maximum=self.in_channels, where="DuoSampler")

    # ---- inputs --------------------------------------------------------------------------------
    def _inputs(self, n, noise, y, generator):
        shape = (self.in_channels, self.img_size, self.img_size)
        where = "DuoSampler.sample"
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentError(f"{where}: generator must be a torch.Generator, got {describe(generator)}")
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise ArgumentError(f"{where}: noise must be a tensor [n, {shape[0]}, {shape[1]}, {shape[2]}], "
                                    f"got {describe(noise)}")
            if noise.dim() != 4 or tuple(noise.shape[1:]) != shape:
                raise ArgumentError(f"{where}: noise must be [n, {shape[0]}, {shape[1]}, {shape[2]}], "
                                    f"got {tuple(noise.shape)}")
            if noise.shape[0] == 0:
                raise ArgumentError(f"{where}: noise holds no samples (shape {tuple(noise.shape)}); "
                                    "need n >= 1")
            if n is not None and check_int(n, "n", where=where) != noise.shape[0]:
                raise ArgumentError(f"{where}: n={n} but noise has {noise.shape[0]} samples")
            if not noise.is_floating_point():
                raise ArgumentError(f"{where}: noise must be floating point, got {noise.dtype}")
            if not bool(torch.isfinite(noise).all()):
                bad = int((~torch.isfinite(noise)).sum())
                raise ArgumentError(f"{where}: noise holds {bad} NaN or infinite values; it must be finite "
                                    "(standard normal)")
            n = noise.shape[0]
            x = noise.to(self.device, torch.float32)
        else:
            if n is None:
                raise ArgumentError(f"{where}: give n >= 1 or a noise tensor (got n=None)")
            n = check_int(n, "n", minimum=1, where=where)
            x = self._randn((n, *shape), generator)
        if self.num_classes > 0:
            if y is None:
                gdev = generator.device if generator is not None else self.device
                y = torch.randint(0, self.label_range(), (n,), generator=generator, device=gdev)
            if not isinstance(y, torch.Tensor):
                arr = np.asarray(y)
                if arr.dtype == object or arr.dtype.kind not in "iu":
                    raise ArgumentError(f"{where}: y must hold integer class labels, got {describe(y)}")
                y = torch.from_numpy(arr.astype(np.int64, copy=False).copy())
            if y.dim() != 1 or y.shape[0] != n:
                raise ArgumentError(f"{where}: y must be a 1-D tensor of {n} labels, got shape {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ArgumentError(f"{where}: y must hold integer class labels, got {y.dtype}")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.label_range():
                raise ArgumentError(f"{where}: labels must lie in [0, {self.label_range()}), "
                                    f"got min {lo} max {hi}")
            y = y.to(self.device, torch.long)
        elif y is not None:
            raise ArgumentError(f"{where}: y was given but the models are unconditional (num_classes=0)")
        return x, y

    def label_range(self) -> int:
        """Real class labels are [0, label_range): the null class of guidance is not one of them."""
        return _label_range(self.num_classes, getattr(self.deep, "null_class", None))

    def _randn(self, shape, generator):
        gdev = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- segments ------------------------------------------------------------------------------
    def scale_of(self, segment: str):
        """The guidance scale of a segment ('shallow' or 'deep'); None = unguided."""
        if segment not in ("shallow", "deep"):
            raise ArgumentError(f"DuoSampler: segment must be 'shallow' or 'deep', got {describe(segment)}")
        return self.shallow_cfg_scale if segment == "shallow" else self.cfg_scale

    def denoiser(self, model, segment=None) -> Denoiser:
        """The eps function (guidance included) that `model` runs in `segment` ('shallow' or 'deep'; by
        default 'shallow' when `model` is the shallow model and not also the deep one). It takes the labels
        as `_model_labels` lays them out."""
        if segment is None:
            segment = "shallow" if model is self.shallow and model is not self.deep else "deep"
        return Denoiser(model, self.in_channels, self.dtype, self.scale_of(segment), self.cfg_channels,
                        doubled_labels=self.guided)

    def eps(self, model, x, t, y=None, segment=None) -> torch.Tensor:
        """One network evaluation exactly as sampling runs it: `model` at network time `t` (a number or a
        0-d tensor, already in the model's time convention) on the float32 state `x`, labels `y`, with
        the guidance of `segment` (see `denoiser`). Returns float32 eps `[B, C, H, W]`."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(())
        return self.denoiser(model, segment)(x, t, self._model_labels(y))

    def _model_labels(self, y):
        """Labels as the networks see them: doubled with the null class when any segment guides."""
        if y is None or not self.guided:
            return y
        return torch.cat([y, torch.full_like(y, self.deep.null_class)])

    # ---- sampling ------------------------------------------------------------------------------
    def sample(self, n=None, noise=None, y=None, generator=None):
        """Draw samples. Returns `[n, C, H, W]` float32 (model space: pixels in [-1, 1] or latents), an
        ordinary tensor (not an inference tensor), on the models' device.

        Deterministic given `generator` (or `noise` plus `y` for deterministic solvers). Random numbers
        are drawn in this order: the initial noise (unless given), the labels (unless given), then one
        draw per noisy step, all before the first network call.
        """
        with torch.inference_mode():
            x = self._sample(n, noise, y, generator)
        return x.clone()  # outside inference mode: an ordinary tensor users may modify in place

    def uses_graphs(self) -> bool:
        """Whether `sample()` replays CUDA graphs ('auto' on CUDA, or True) rather than running eagerly.
        Never with a diffusers scheduler as the solver (eager only)."""
        return self.scheduler is None and self.device.type == "cuda" and self.cuda_graphs in ("auto", True)

    def graph_runner(self, capture=None):
        """The `GraphRunner` of this sampler (`capture=False` runs its static-buffer path eagerly)."""
        from .graphs import GraphRunner
        if capture is not None:
            return GraphRunner(self, capture=capture, mode=self.graph_mode, max_bucket=self.graph_max_bucket)
        if self._runner is None:
            self._runner = GraphRunner(self, mode=self.graph_mode, max_bucket=self.graph_max_bucket)
        return self._runner

    def release_graphs(self):
        """Free the graphs and static buffers captured for this pair of models."""
        from .graphs import CACHE
        CACHE.release(lambda k: k[0] == id(self.shallow) and k[1] == id(self.deep))

    def _sample_scheduler(self, x, y, generator):
        from .diffusers_loop import make_model_fn, run_scheduler_loop
        fn = make_model_fn(self.shallow, self.deep, schedule=self.schedule, time_convention=self.time_convention,
                           y=y, cfg_scale=self.cfg_scale, shallow_cfg_scale=self.shallow_cfg_scale,
                           dtype=self.dtype, guide_channels=self.cfg_channels)
        trace = SampleTrace(seconds={"shallow": 0.0, "deep": 0.0})
        x = run_scheduler_loop(self.scheduler, self.steps, self.switch, fn, x, generator,
                               plan=self.scheduler_plan, step_kwargs=self._step_kwargs, trace=trace,
                               progress=self.progress)
        self.trace = trace  # models / timesteps per model evaluation (Heun: two per step)
        return x

    def _sample(self, n, noise, y, generator):
        x, y = self._inputs(n, noise, y, generator)
        if self.scheduler is not None:
            return self._sample_scheduler(x, y, generator)
        step_noise = draw_step_noise(self.solver, tuple(x.shape), generator, self.device)
        if self.uses_graphs():
            trace = SampleTrace(seconds={"shallow": 0.0, "deep": 0.0}, graphs=True)
            t_start = time.perf_counter()
            x = self.graph_runner().run(x, y, step_noise, trace)
            for seg in self.segments:
                trace.models += [seg.name] * len(seg)
            trace.timesteps = list(self._timesteps_host)
            trace.total_seconds = time.perf_counter() - t_start
            self.trace = trace
            return x
        state = self.solver.init_state(x)
        y_in = self._model_labels(y)
        trace = SampleTrace(seconds={"shallow": 0.0, "deep": 0.0})
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.steps, desc="sampling", unit="step", leave=False)
        self._sync()
        t_start = time.perf_counter()
        for seg in self.segments:
            t0 = time.perf_counter()
            x = run_segment(self.denoiser(seg.model, seg.name), self.solver, state, x, seg.start, seg.stop,
                            self._model_times, y_in, step_noise,
                            on_step=None if bar is None else (lambda i: bar.update(1)))
            self._sync()  # segment boundary: the only place the host waits
            trace.seconds[seg.name] += time.perf_counter() - t0
            trace.models += [seg.name] * len(seg)
        if bar is not None:
            bar.close()
        trace.timesteps = list(self._timesteps_host)
        trace.total_seconds = time.perf_counter() - t_start
        self.trace = trace
        return x

    def compute_fraction(self) -> float:
        """Fraction of deep-only compute this sampler spends, counting transformer blocks (DESIGN §2), a
        guided step counting twice (two forwards). Deep-only means the deep model at `cfg_scale`; with one
        scale for both segments this is the plain block count."""
        ds = getattr(self.shallow, "depth_blocks", None)
        dd = getattr(self.deep, "depth_blocks", None)
        if ds is None or dd is None:
            raise ArgumentError("compute_fraction needs models with depth_blocks")
        if self.scheduler is not None:  # counted per model evaluation
            n, k = self.scheduler_plan.evaluations, self.scheduler_plan.shallow_evaluations
        else:
            n, k = self.steps, self.k
        ps, pd = (2 if guides(self.scale_of(name)) else 1 for name in ("shallow", "deep"))
        return (ds * ps * k + dd * pd * (n - k)) / (dd * pd * n)

    def __repr__(self):
        return (f"DuoSampler(solver={self.solver_name}, steps={self.steps}, shallow_steps={self.k}, "
                f"schedule={self.schedule.name}, cfg_scale={self.cfg_scale}, "
                + (f"shallow_cfg_scale={self.shallow_cfg_scale}, "
                   if self.shallow_cfg_scale != self.cfg_scale else "")
                + f"dtype={self.dtype})")

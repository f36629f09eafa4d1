"""Eager sampling with any diffusers scheduler instance, with DuoDiff's shallow-then-deep switch.

`run_scheduler_loop` is the loop diffusers pipelines run (`set_timesteps`, initial noise times
`init_noise_sigma`, per evaluation `scale_model_input` -> model -> `step`), with the model chosen per
solver step. At `switch=0` it computes exactly what a plain diffusers loop over the deep model computes
(tested bit for bit for DDIM, DDPM, DPM-Solver++, UniPC, Euler, Euler ancestral, Heun, KDPM2).
diffusers is never imported here: a scheduler is anything with `config`, `set_timesteps` and `step`
(and usually `scale_model_input`).

Conventions (the same as diffusers' DiTPipeline unless said otherwise):
- Network time: the scheduler's timestep as it is (integer for DDIM/DPM-Solver/UniPC, fractional for
  Euler/Heun/KDPM2 with 'linspace' spacing or Karras sigmas), mapped by the model's time convention
  (`Schedule.model_time`: DiT is fed t itself, frac1000 models t/1000, discrete U-ViT t+1). DiTPipeline
  feeds t as is to DiT as well.
- Guidance: `uncond + w (cond - uncond)` on the first `guide_channels` output channels (default: all
  latent channels, as DiTPipeline), cond and uncond in one batch [x, x] with labels [y, null].
- Learned sigma (DiT's 2C output channels): only the first C (eps) go to `step`, as DiTPipeline
  does, except for schedulers configured with `variance_type` 'learned' / 'learned_range' (DDPM), which
  get the full output (guided eps, conditional variance) and use the variance: DiT's own sampler.
- Differences from DiTPipeline, on purpose: the initial noise is scaled by `init_noise_sigma` and
  `step` gets the unscaled sample, as every other diffusers pipeline does (DiTPipeline skips the first
  and passes the scaled input, which is only right for schedulers whose `scale_model_input` is the
  identity: DDIM, DDPM, DPM-Solver, UniPC); the sample is stepped once, not twice in the guided
  batch; and stochastic schedulers draw their noise from the caller's `generator`.

Switch: `switch` counts *solver steps* (`num_inference_steps`), never model evaluations. Every
evaluation of one solver step runs on the same model: for Heun (predictor at t_i, corrector at t_i+1)
and KDPM2 (point and midpoint) a step is two evaluations, the last one. A step begins where the
scheduler is in its first-order state (`state_in_first_order`; schedulers without it evaluate once per
step). So `switch=0.4` with 10 Heun steps runs the first 4 steps, 8 evaluations, on the shallow model;
`AtTimestep(t)` gives the shallow model every leading step whose first timestep is >= t. The step
structure is found by a dry run of a copy of the scheduler (`plan_scheduler`), so it holds for any
scheduler.

Schedulers are refused (ValueError naming the mismatch) when their `prediction_type` is not 'epsilon'
(our models predict noise), `timestep_type` is not 'discrete', `num_train_timesteps` or the betas
(compared through `alphas_cumprod`, rtol 1e-4) differ from the model's training schedule, the model's
schedule is continuous (VP-SDE U-ViT pixel models), the scheduler has no beta schedule (flow matching,
EDM), or `variance_type` is learned while the model does not learn sigma. Spacing, offsets, solver
order, Karras sigmas, thresholding and clipping are the user's choice.

Why eager only: a diffusers `step` keeps Python state (step index, lists of past outputs, order
switching), calls `.item()`, builds tensors and draws noise inside, so it cannot be captured in a CUDA
Graph; the library's own solvers precompute every coefficient and take pre-drawn noise, which is what
graph capture needs.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field

import torch

__all__ = [
    "LEARNED_VARIANCE",
    "SchedulerPlan",
    "check_scheduler",
    "is_scheduler",
    "make_model_fn",
    "make_scheduler",
    "plan_scheduler",
    "run_scheduler_loop",
]

LEARNED_VARIANCE = ("learned", "learned_range")
_ALPHAS_RTOL = 1e-4  # diffusers builds alphas_cumprod in float32 (few 1e-7 off ours); a wrong beta config is >1e-2


def is_scheduler(obj) -> bool:
    """Whether `obj` looks like a diffusers scheduler instance (duck-typed: diffusers stays optional)."""
    return (not isinstance(obj, (str, type)) and all(callable(getattr(obj, a, None)) for a in ("set_timesteps", "step"))
            and hasattr(obj, "config"))


def _scale_input(scheduler, x, t):
    scale = getattr(scheduler, "scale_model_input", None)  # absent on some (flow matching); identity then
    return scale(x, t) if scale is not None else x


def _cfg(scheduler) -> dict:
    return dict(getattr(scheduler, "config", {}) or {})


def check_scheduler(scheduler, schedule=None, *, learned_sigma: bool = False) -> bool:
    """Refuse a scheduler that cannot drive these models (see the module docstring). `schedule` is the
    models' training schedule (a Schedule, a name or a dict; None skips the schedule comparison).
    Returns whether `step` should get the learned-variance channels."""
    name = type(scheduler).__name__
    if not is_scheduler(scheduler):
        raise TypeError(f"solver must be 'ddim', 'ddpm', 'dpmsolver++' or a diffusers scheduler instance (with "
                        f"config, set_timesteps and step), got {name}")
    cfg = _cfg(scheduler)
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"{name}: prediction_type={pred!r}, but duodiff-fast models predict noise; create the "
                         f"scheduler with prediction_type='epsilon'")
    ttype = cfg.get("timestep_type", "discrete")
    if ttype != "discrete":
        raise ValueError(f"{name}: timestep_type={ttype!r} feeds the network a sigma-derived time our models "
                         "were not trained on; use timestep_type='discrete'")
    variance = cfg.get("variance_type")
    pass_variance = variance in LEARNED_VARIANCE
    if pass_variance and not learned_sigma:
        raise ValueError(f"{name}: variance_type={variance!r} needs a model that predicts its variance "
                         "(learned sigma); this one does not: use variance_type='fixed_small'")
    if schedule is None:
        return pass_variance
    from .schedules import get_schedule
    schedule = get_schedule(schedule)
    if schedule.kind != "discrete":
        raise ValueError(f"{name}: the models were trained on the continuous {schedule.name!r} schedule, which "
                         "diffusers' discrete-time schedulers do not represent; use solver='ddim' or "
                         "'dpmsolver++'")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{name} has no alphas_cumprod: it is not a beta-schedule (DDPM-family) scheduler "
                         "(flow matching and EDM schedulers are not), and our models are trained on one")
    T = cfg.get("num_train_timesteps", len(ac))
    mismatches = []
    if T != schedule.T or len(ac) != schedule.T:
        mismatches.append(f"num_train_timesteps={T} but the model was trained with T={schedule.T}")
    else:
        theirs = torch.as_tensor(ac).detach().to("cpu", torch.float64)
        ours = schedule.alphas_cumprod.to(torch.float64)
        rel = ((theirs - ours).abs() / ours).max().item()
        if rel > _ALPHAS_RTOL:
            setting = ", ".join(f"{k}={cfg[k]!r}" for k in ("beta_schedule", "beta_start", "beta_end",
                                                             "rescale_betas_zero_snr") if k in cfg)
            if cfg.get("trained_betas") is not None:
                setting += ", trained_betas given"
            mismatches.append(f"its betas ({setting}) give alphas_cumprod up to {rel:.2%} off the model's "
                              f"{schedule.name!r} schedule (betas {float(schedule.betas[0]):g}.."
                              f"{float(schedule.betas[-1]):g}, T={schedule.T})")
    if mismatches:
        raise ValueError(f"{name} does not match the models' training schedule: " + "; ".join(mismatches)
                         + "; build the scheduler with the model's schedule (e.g. beta_schedule='linear', "
                           "beta_start=0.0001, beta_end=0.02 for DiT)")
    return pass_variance


def make_scheduler(name: str, schedule, **config):
    """A diffusers scheduler of class `name` (e.g. 'UniPCMultistepScheduler') on the models' training
    `schedule`: num_train_timesteps and betas from it, prediction_type='epsilon', and for DDIM/DDPM
    clip_sample=False (diffusers defaults to clipping x0 to [-1, 1], wrong for latents) unless `config`
    says otherwise. Needs diffusers."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"scheduler {name!r} needs diffusers (pip install diffusers); the library's own "
                          "solvers ('ddim', 'ddpm', 'dpmsolver++') do not") from e
    from .schedules import get_schedule
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not name.endswith("Scheduler"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"unknown diffusers scheduler {name!r}; diffusers {diffusers.__version__} has "
                         f"{', '.join(known)}")
    schedule = get_schedule(schedule)
    if schedule.kind != "discrete":
        raise ValueError(f"diffusers schedulers are discrete-time; the {schedule.name!r} schedule is continuous")
    b0, b1 = float(schedule.betas[0]), float(schedule.betas[-1])
    betas = {"linear": dict(beta_schedule="linear", beta_start=b0, beta_end=b1),
             "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=b0, beta_end=b1),
             "cosine": dict(beta_schedule="squaredcos_cap_v2")}.get(schedule.name)
    if betas is None:
        raise ValueError(f"no diffusers beta_schedule for the {schedule.name!r} schedule")
    cfg = dict(num_train_timesteps=schedule.T, prediction_type="epsilon", **betas)
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        cfg["clip_sample"] = False
    cfg.update(config)
    scheduler = cls(**cfg)
    check_scheduler(scheduler, schedule)
    return scheduler


# -----------------------------------------------------------------------------
# Plan: the step structure of a scheduler, and which model each evaluation uses
# -----------------------------------------------------------------------------

@dataclass
class SchedulerPlan:
    """What `run_scheduler_loop` will do: one entry per model evaluation."""
    scheduler: object                                   # a private, validated copy
    steps: int                                          # num_inference_steps
    timesteps: list = field(default_factory=list)       # scheduler timestep per evaluation
    step_of_eval: list = field(default_factory=list)    # solver step each evaluation belongs to
    models: list = field(default_factory=list)          # 'shallow' | 'deep' per evaluation
    n_steps: int = 0                                    # solver steps
    k: int = 0                                          # solver steps on the shallow model
    pass_variance: bool = False                         # step() gets the learned-variance channels

    @property
    def evaluations(self) -> int:
        return len(self.timesteps)

    @property
    def shallow_evaluations(self) -> int:
        return sum(m == "shallow" for m in self.models)


def _accepts(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _step(scheduler, out, t, x, generator, step_kwargs):
    kw = dict(step_kwargs or {})
    if generator is not None and _accepts(scheduler.step, "generator"):
        kw["generator"] = generator
    return scheduler.step(out, t, x, return_dict=False, **kw)[0]


def plan_scheduler(scheduler, steps: int, switch=0.0, *, schedule=None, learned_sigma: bool = False,
                   step_kwargs=None) -> SchedulerPlan:
    """Validate `scheduler` (see `check_scheduler`), find its step structure for `steps` by a dry run of a
    copy on a 1x1x2x2 zero sample, and assign models: the first `k` solver steps (from `switch`, as
    `duodiff_fast.sampling.shallow_steps` reads it) to the shallow model."""
    from .._validate import check_int
    from .duo import shallow_steps
    steps = check_int(steps, "steps", minimum=1, where=type(scheduler).__name__)
    pass_variance = check_scheduler(scheduler, schedule, learned_sigma=learned_sigma)
    template = copy.deepcopy(scheduler)
    probe = copy.deepcopy(template)
    probe.set_timesteps(steps, device="cpu")
    x = torch.zeros(1, 1, 2, 2)
    zero_out = torch.zeros(1, 2 if pass_variance else 1, 2, 2)
    g = torch.Generator().manual_seed(0)  # the dry run must not touch the global RNG
    ts, step_of, starts = [], [], []
    step = -1
    for t in probe.timesteps:
        if bool(getattr(probe, "state_in_first_order", True)):
            step += 1
            starts.append(float(t))
        ts.append(float(t))
        step_of.append(step)
        _scale_input(probe, x, t)  # some schedulers track state here (Euler: is_scale_input_called)
        x = _step(probe, zero_out, t, x, g, step_kwargs)
    if not ts:
        raise ValueError(f"{type(scheduler).__name__}.set_timesteps({steps}) gave no timesteps")
    from .schedules import get_schedule
    k = shallow_steps(switch, torch.tensor(starts, dtype=torch.float64),
                      None if schedule is None else get_schedule(schedule))
    models = ["shallow" if s < k else "deep" for s in step_of]
    return SchedulerPlan(scheduler=template, steps=steps, timesteps=ts, step_of_eval=step_of, models=models,
                         n_steps=len(starts), k=k, pass_variance=pass_variance)


# -----------------------------------------------------------------------------
# The model function (our models, DiTPipeline's guidance)
# -----------------------------------------------------------------------------

def make_model_fn(shallow, deep, *, schedule, time_convention=None, y=None, cfg_scale=None, dtype=None,
                  guide_channels=None, shallow_cfg_scale=None):
    """`model_fn(name, x, t)` for `run_scheduler_loop` from our models: `x` (B, C, H, W) float32 model input,
    `t` the scheduler's timestep; returns the full output (B, C_out, H, W) float32, guided when the scale
    of `name` is set and != 1 on the first `guide_channels` channels (default C), the other channels
    from the conditional half. The deep model's scale is `cfg_scale`, the shallow model's
    `shallow_cfg_scale` (None = `cfg_scale`)."""
    from .schedules import get_schedule
    schedule = get_schedule(schedule)
    models = {"shallow": shallow, "deep": deep}
    from .._validate import check_float
    from .segments import guides
    scales = {"shallow": cfg_scale if shallow_cfg_scale is None else shallow_cfg_scale, "deep": cfg_scale}
    for name, w in scales.items():
        if w is None:
            continue
        arg = "cfg_scale" if name == "deep" or shallow_cfg_scale is None else "shallow_cfg_scale"
        w = scales[name] = check_float(w, arg, minimum=0.0, where="guidance")
        if not guides(w):
            continue
        if y is None:
            raise ValueError(f"{arg}={w:g} needs class labels y (guidance pairs each label with the null "
                             "class)")
        if getattr(models[name], "null_class", None) is None:
            raise ValueError(f"{arg}={w:g} but the {name} model has no null_class (it was "
                             "trained without label dropout: no unconditional branch)")

    def model_fn(name, x, t):
        model = models[name]
        w = scales[name]
        conv = time_convention or getattr(model, "time_convention", None) or "int"
        B = x.shape[0]
        tm = schedule.model_time(torch.as_tensor(t).reshape(1), conv).to(x.device, torch.float32).expand(B)
        xin = x.to(dtype or next(model.parameters()).dtype)
        if not guides(w):
            out = model(xin, tm, y) if y is not None else model(xin, tm)
            return out.float()
        null = torch.full_like(y, model.null_class)
        out = model(torch.cat([xin, xin]), torch.cat([tm, tm]), torch.cat([y, null])).float()
        C = guide_channels or x.shape[1]
        cond, uncond = out[:, :C].chunk(2)
        return torch.cat([uncond + w * (cond - uncond), out[:B, C:]], dim=1)

    return model_fn


# -----------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_scheduler_loop(scheduler, steps, switch, model_fn, noise, generator=None, *, schedule=None,
                       learned_sigma=False, step_kwargs=None, plan: SchedulerPlan | None = None, trace=None,
                       progress=False):
    """Sample from `noise` (B, C, H, W; the standard normal draw, float32) with a diffusers scheduler.

    `model_fn(name, x, t)`: name 'shallow' or 'deep', x the scaled model input, t the scheduler's timestep;
    returns the model output with C (eps) or 2C (eps + learned variance) channels, guided (see
    `make_model_fn`). The first `plan.k` solver steps use 'shallow'. `generator` feeds stochastic
    schedulers' `step`; `step_kwargs` go to every `step` (e.g. {'eta': 1.0} for DDIM). A `plan` from
    `plan_scheduler` (made once, e.g. in a sampler's constructor) replaces `scheduler`, `steps`, `switch`,
    `schedule` and `learned_sigma`, which are then ignored. The caller's scheduler is never modified (a
    copy runs).

    `trace` (optional, e.g. a SampleTrace) gets per *evaluation*: `.models`, `.timesteps`; and
    `.seconds` {'shallow', 'deep'} and `.total_seconds`. Returns the final sample (noise's dtype).
    """
    if plan is None:
        plan = plan_scheduler(scheduler, steps, switch, schedule=schedule, learned_sigma=learned_sigma,
                              step_kwargs=step_kwargs)
    if noise.dim() < 2:
        raise ValueError(f"noise must be [B, C, ...], got shape {tuple(noise.shape)}")
    sched = copy.deepcopy(plan.scheduler)
    device = noise.device
    sched.set_timesteps(plan.steps, device=device)
    timesteps = sched.timesteps
    if len(timesteps) != plan.evaluations:
        raise RuntimeError(f"{type(sched).__name__} gave {len(timesteps)} timesteps on {device}, "
                           f"{plan.evaluations} in the dry run")
    C = noise.shape[1]
    x = noise * sched.init_noise_sigma
    seconds = {"shallow": 0.0, "deep": 0.0}
    evals = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm
        evals = tqdm(evals, desc="sampling", unit="eval", leave=False)
    _sync(device)
    t_start = seg_start = time.perf_counter()
    current = plan.models[0]
    for j in evals:
        name = plan.models[j]
        if name != current:  # segment boundary: close the previous segment's clock
            _sync(device)
            now = time.perf_counter()
            seconds[current] += now - seg_start
            seg_start, current = now, name
        t = timesteps[j]
        out = model_fn(name, _scale_input(sched, x, t), t)
        if out.shape[1] == 2 * C and not plan.pass_variance:
            out = out[:, :C]  # learned sigma: the scheduler takes eps only, as DiTPipeline
        elif out.shape[1] != (2 * C if plan.pass_variance else C):
            want = f"{2 * C} (eps + learned variance)" if plan.pass_variance else f"{C} or {2 * C}"
            raise ValueError(f"model output has {out.shape[1]} channels for a {C}-channel sample; expected {want}")
        x = _step(sched, out, t, x, generator, step_kwargs)
    _sync(device)
    end = time.perf_counter()
    seconds[current] += end - seg_start
    if trace is not None:
        trace.models = list(plan.models)
        trace.timesteps = list(plan.timesteps)
        trace.seconds = seconds
        trace.total_seconds = end - t_start
    return x

"""Sampling solvers for epsilon-prediction networks: DDPM ancestral, DDIM (eta), DPM-Solver++ (2M / 3M).

Every solver follows diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler (v0.42)
step for step on discrete schedules, but is written for a sampler that swaps networks between steps
and captures steps in CUDA Graphs:

    solver = get_solver("ddim", schedule, steps=50, spacing="leading", eta=0.0).to(device)
    state = solver.init_state(x)
    for i, t in enumerate(solver.timesteps):
        eps = net(x, schedule.model_time(t, convention))
        noise = torch.randn(x.shape, generator=g, device=x.device) if solver.needs_noise(i) else None
        x = solver.step(state, i, x, eps, noise)

All per-step coefficients are precomputed in float64 at construction, so ``step`` is pure tensor math:
no ``.item()``, no host sync, no branching on tensor values; multistep history lives in buffers of
``state`` updated in place (a captured graph keeps updating them on replay). ``i`` may be a Python int or
a 0-d integer tensor on the solver's device. The update runs in at least float32 (x in bf16/fp16 is
upcast for the arithmetic) and the result has x's dtype; keep x in float32 across steps for best accuracy.

Continuous schedules (VP-SDE): the network is evaluated at ``schedule.timesteps(steps, spacing)``
(default: uniform from t=1 down to t=eps=1e-3, inclusive) and the last step goes from t=eps to clean
data (alpha=1, sigma=0), the analogue of diffusers' ``set_alpha_to_one`` / ``final_sigmas_type='zero'``.
"""
from __future__ import annotations

import numpy as np
import torch

from .._validate import ArgumentError, check_choice, check_float, check_int
from .schedules import Schedule, get_schedule

__all__ = ["Solver", "DDPMSolver", "DDIMSolver", "DPMSolverPP", "get_solver", "SOLVERS"]


def _check_steps(schedule: Schedule, steps) -> int:
    steps = check_int(steps, "steps", minimum=1)
    if schedule.kind == "discrete" and steps > schedule.T:
        raise ArgumentError(f"steps={steps} exceeds the {schedule.T} training timesteps of schedule "
                            f"{schedule.name!r}")
    return steps


def _check_clip(clip_sample):
    if clip_sample is None:
        return None
    return check_float(clip_sample, "clip_sample", minimum=0.0, exclusive_minimum=True)


def _f64(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


class Solver:
    """Common interface. Attributes: ``timesteps`` (descending schedule times, length ``steps``),
    ``prev_timesteps`` (where each step lands; -1 (discrete) or 0.0 (continuous) means clean data)."""

    name: str
    order: int = 1
    eta: float = 0.0
    _coef_names: tuple[str, ...] = ()

    def __init__(self, schedule, steps: int):
        self.schedule = get_schedule(schedule)
        self.steps = _check_steps(self.schedule, steps)
        self._noise_steps: list[bool] = [False] * self.steps

    def __len__(self) -> int:
        return self.steps

    def to(self, device) -> "Solver":
        """Move timesteps and coefficient tensors to ``device`` (returns self)."""
        self.timesteps = self.timesteps.to(device)
        for n in self._coef_names:
            setattr(self, n, getattr(self, n).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    def needs_noise(self, i: int) -> bool:
        """Whether step ``i`` adds fresh Gaussian noise (then ``step`` needs ``noise``)."""
        return self._noise_steps[i]

    def init_state(self, x: torch.Tensor) -> dict:
        """Per-run state (multistep history buffers); a fresh one for every sampling run."""
        return {}

    def step(self, state: dict, i, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None):
        raise NotImplementedError

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def _check_noise(self, i, noise) -> None:
        # Only checkable for a Python index; with a tensor index the sampler must always pass noise.
        if noise is None and isinstance(i, (int, np.integer)) and self._noise_steps[i]:
            raise ValueError(f"{self.name} step {i} adds noise: pass `noise` (see needs_noise(i))")

    def __repr__(self) -> str:
        extra = f", eta={self.eta}" if self.name == "ddim" else ""
        return f"{type(self).__name__}(schedule={self.schedule.name!r}, steps={self.steps}{extra})"


def _alpha_sigma_pairs(schedule: Schedule, t, t_prev, final_alphabar: float = 1.0):
    """float64 numpy (alpha_t, sigma_t, alpha_prev, sigma_prev); t_prev < 0 (discrete) or <= 0
    (continuous) means the final target with alphabar = ``final_alphabar``."""
    a_t, s_t = (v.numpy() for v in schedule.alpha_sigma(torch.as_tensor(t)))
    t_prev = np.asarray(t_prev)
    final = t_prev < 0 if schedule.kind == "discrete" else t_prev <= 0
    safe_prev = np.where(final, t[-1] if schedule.kind == "discrete" else 1.0, t_prev)
    a_p, s_p = (v.numpy() for v in schedule.alpha_sigma(torch.as_tensor(safe_prev)))
    a_p = np.where(final, np.sqrt(final_alphabar), a_p)
    s_p = np.where(final, np.sqrt(1.0 - final_alphabar), s_p)
    return a_t, s_t, a_p, s_p


def _x0(x, eps, rs, ss, i, clip):
    """x0 prediction (x - sigma eps) / alpha as x * (1/alpha) - eps * (sigma/alpha), optionally clamped."""
    x0 = x * rs[i] - eps * ss[i]
    return x0 if clip is None else x0.clamp(-clip, clip)


def _first_order_step(solver, i, x, eps, noise, coef, on_eps):
    """DDPM / DDIM update: x0 * c_x0[i] + (eps if on_eps else x) * coef[i] (+ noise * std[i])."""
    solver._check_noise(i, noise)
    cdt = solver._compute_dtype(x)
    xc, ec = x.to(cdt), eps.to(cdt)
    x0 = _x0(xc, ec, solver._rs, solver._ss, i, solver.clip_sample)
    out = x0 * solver._c_x0[i] + (ec if on_eps else xc) * coef[i]
    if noise is not None:
        out = out + noise.to(cdt) * solver._std[i]
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# DDPM ancestral
# ---------------------------------------------------------------------------------------------------------

class DDPMSolver(Solver):
    """DDPM ancestral sampling, diffusers DDPMScheduler semantics with variance 'fixed_small':
    each step goes to the next timestep of the list (the last one to alphabar=1); with fewer steps than
    T the per-step beta is 1 - alphabar_t / alphabar_prev. Noise is added wherever t > 0.
    ``clip_sample``: None (default; diffusers defaults to clipping at 1.0) or the clamp range for x0."""

    name = "ddpm"
    _coef_names = ("_rs", "_ss", "_c_x0", "_c_x", "_std")

    def __init__(self, schedule, steps: int, spacing: str | None = None, steps_offset: int = 0,
                 clip_sample: float | None = None):
        super().__init__(schedule, steps)
        if self.schedule.kind != "discrete":
            raise ValueError("DDPM ancestral sampling needs a discrete schedule; use 'ddim' or 'dpmsolver++' "
                             f"with the continuous schedule {self.schedule.name!r}")
        self.clip_sample = _check_clip(clip_sample)
        ts = self.schedule.timesteps(self.steps, spacing, steps_offset=steps_offset)
        t = ts.numpy()
        t_prev = np.concatenate([t[1:], [-1]])
        a_t, s_t, a_p, s_p = _alpha_sigma_pairs(self.schedule, t, t_prev)
        ab_t, ab_p = a_t ** 2, a_p ** 2
        alpha_step = ab_t / ab_p
        beta_step = 1.0 - alpha_step
        var = np.maximum(s_p ** 2 / s_t ** 2 * beta_step, 1e-20)  # diffusers clamps before the sqrt
        self.timesteps = ts
        self.prev_timesteps = torch.from_numpy(t_prev.copy())
        self._rs, self._ss = _f64(1.0 / a_t), _f64(s_t / a_t)
        self._c_x0 = _f64(a_p * beta_step / s_t ** 2)
        self._c_x = _f64(np.sqrt(alpha_step) * s_p ** 2 / s_t ** 2)
        self._std = _f64(np.where(t > 0, np.sqrt(var), 0.0))
        self._noise_steps = [bool(v) for v in t > 0]

    def step(self, state, i, x, eps, noise=None):
        """x_t -> x_prev from the network's epsilon; ``noise`` ~ N(0, I) where ``needs_noise(i)``."""
        return _first_order_step(self, i, x, eps, noise, self._c_x, on_eps=False)


# ---------------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------------

class DDIMSolver(Solver):
    """DDIM with ``eta`` (0: deterministic), diffusers DDIMScheduler semantics.

    Discrete schedules: like diffusers, the previous timestep is ``t - T // steps`` for *every* spacing
    (for 'linspace'/'trailing' that point need not be in the list), and a negative one uses alphabar=1
    (``set_alpha_to_one=True``) or alphabar[0]. Continuous: the next grid time, then clean data.
    ``clip_sample``: None (default, as diffusers' clip_sample=False) or the clamp range for x0."""

    name = "ddim"
    _coef_names = ("_rs", "_ss", "_c_x0", "_c_eps", "_std")

    def __init__(self, schedule, steps: int, spacing: str | None = None, eta: float = 0.0,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, clip_sample: float | None = None):
        super().__init__(schedule, steps)
        # eta = 1 gives the DDPM posterior variance; beyond it the update would need a negative variance.
        self.eta = check_float(eta, "eta", minimum=0.0, maximum=1.0, where="ddim")
        self.clip_sample = _check_clip(clip_sample)
        steps = self.steps
        if self.schedule.kind == "discrete":
            ts = self.schedule.timesteps(steps, spacing, steps_offset=steps_offset)
            t = ts.numpy()
            t_prev = t - self.schedule.T // steps
            t_prev = np.where(t_prev < 0, -1, t_prev)
            final_ab = 1.0 if set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        else:
            ts = self.schedule.timesteps(steps, spacing)
            t = ts.numpy()
            t_prev = np.concatenate([t[1:], [0.0]])
            final_ab = 1.0
        a_t, s_t, a_p, s_p = _alpha_sigma_pairs(self.schedule, t, t_prev, final_ab)
        var = (s_p ** 2 / s_t ** 2) * (1.0 - (a_t / a_p) ** 2)
        std = self.eta * np.sqrt(np.maximum(var, 0.0))
        self.timesteps = ts
        self.prev_timesteps = torch.from_numpy(t_prev.copy())
        self._rs, self._ss = _f64(1.0 / a_t), _f64(s_t / a_t)
        self._c_x0 = _f64(a_p)
        # max(., 0) guards the sqrt against rounding; it is >= 0 in exact arithmetic for eta <= 1.
        self._c_eps = _f64(np.sqrt(np.maximum(s_p ** 2 - std ** 2, 0.0)))
        self._std = _f64(std)
        self._noise_steps = [bool(v) for v in std > 0]

    def step(self, state, i, x, eps, noise=None):
        """x_t -> x_prev; ``noise`` ~ N(0, I) where ``needs_noise(i)`` (eta > 0)."""
        return _first_order_step(self, i, x, eps, noise, self._c_eps, on_eps=True)


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++ multistep
# ---------------------------------------------------------------------------------------------------------

def _dpm_discrete_timesteps(T: int, steps: int, spacing: str | None, steps_offset: int = 0) -> np.ndarray:
    """diffusers DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped=-inf): 'linspace' and
    'leading' place steps+1 points and drop the last (t=0), unlike DDIM/DDPM's grids."""
    from .schedules import DISCRETE_SPACINGS
    spacing = "leading" if spacing is None else check_choice(spacing, "spacing", DISCRETE_SPACINGS)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = T // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / steps).round().astype(np.int64)[:steps] - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r} for a discrete schedule; expected one of "
                         "('leading', 'trailing', 'linspace')")
    if len(ts) != steps or (np.diff(ts) >= 0).any() or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"DPM-Solver++ with steps={steps}, spacing={spacing!r} gives repeated or "
                         f"out-of-range timesteps {ts[:8].tolist()}...; use fewer steps or another spacing")
    return ts.copy()


class DPMSolverPP(Solver):
    """DPM-Solver++ multistep (data prediction, midpoint), diffusers DPMSolverMultistepScheduler defaults:
    ``solver_order`` 2 (or 3), lower_order_final=True, final_sigmas_type='zero', no Karras sigmas.

    Step i uses order min(solver_order, i + 1); the last step is first order and lands on clean data;
    with 3M and fewer than 15 steps the second-to-last step is second order."""

    name = "dpmsolver++"
    _coef_names = ("_rs", "_ss", "_c_x", "_c_m0", "_c_m1", "_c_m2")

    def __init__(self, schedule, steps: int, spacing: str | None = None, solver_order: int = 2,
                 lower_order_final: bool = True, steps_offset: int = 0):
        super().__init__(schedule, steps)
        self.order = check_int(solver_order, "solver_order", minimum=1, maximum=3, where="dpmsolver++")
        self.name = {1: "dpmsolver++1", 2: "dpmsolver++", 3: "dpmsolver++3m"}[self.order]
        n = self.steps
        if self.schedule.kind == "discrete":
            t = _dpm_discrete_timesteps(self.schedule.T, n, spacing, steps_offset)
            ts = torch.from_numpy(t)
            t_prev = np.concatenate([t[1:], [-1]])
        else:
            ts = self.schedule.timesteps(n, spacing)
            t = ts.numpy()
            t_prev = np.concatenate([t[1:], [0.0]])
        a, s = (v.numpy() for v in self.schedule.alpha_sigma(torch.as_tensor(t)))
        # Grid points 0..n-1 are evaluation points; point n is clean data (alpha=1, sigma=0, lambda=+inf).
        a_all = np.concatenate([a, [1.0]])
        s_all = np.concatenate([s, [0.0]])
        with np.errstate(divide="ignore"):
            lam = np.log(a_all) - np.log(s_all)

        c_x, c_m = np.zeros(n), np.zeros((n, 3))  # x_next = c_x x + c_m . (m0, m1, m2)
        for i in range(n):
            order = min(self.order, i + 1)
            if i == n - 1:
                order = 1  # final_sigmas_type='zero' forces a first-order last step
            elif self.order == 3 and lower_order_final and n < 15 and i == n - 2:
                order = min(order, 2)
            if i == n - 1:
                # sigma_next = 0: exp(-h) = 0, so the update is exactly the data prediction m0.
                c_x[i], c_m[i] = 0.0, (1.0, 0.0, 0.0)
                continue
            h = lam[i + 1] - lam[i]
            at = a_all[i + 1]
            em1 = np.expm1(-h)  # exp(-h) - 1, accurate for small h
            c_x[i] = s_all[i + 1] / s_all[i]
            A0 = -at * em1
            if order == 1:
                c_m[i] = (A0, 0.0, 0.0)
            elif order == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                c_m[i] = (A0 * (1.0 + 0.5 / r0), -0.5 * A0 / r0, 0.0)
            else:
                r0 = (lam[i] - lam[i - 1]) / h
                r1 = (lam[i - 1] - lam[i - 2]) / h
                A1 = at * (em1 / h + 1.0)
                A2 = -at * ((em1 + h) / h ** 2 - 0.5)
                d10 = np.array([1.0 / r0, -1.0 / r0, 0.0])
                d11 = np.array([0.0, 1.0 / r1, -1.0 / r1])
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                c_m[i] = A0 * np.array([1.0, 0.0, 0.0]) + A1 * d1 + A2 * d2
        self.timesteps = ts
        self.prev_timesteps = torch.from_numpy(t_prev.copy())
        self._rs, self._ss = _f64(1.0 / a), _f64(s / a)
        self._c_x = _f64(c_x)
        self._c_m0, self._c_m1, self._c_m2 = _f64(c_m[:, 0]), _f64(c_m[:, 1]), _f64(c_m[:, 2])

    def init_state(self, x):
        """History of data predictions, zero-filled (their coefficients are 0 until filled)."""
        cdt = self._compute_dtype(x)
        state = {}
        if self.order >= 2:
            state["m1"] = torch.zeros(x.shape, dtype=cdt, device=x.device)
        if self.order >= 3:
            state["m2"] = torch.zeros(x.shape, dtype=cdt, device=x.device)
        return state

    def step(self, state, i, x, eps, noise=None):
        """x_t -> x_next; deterministic (``noise`` is ignored). Updates ``state`` in place."""
        cdt = self._compute_dtype(x)
        xc, ec = x.to(cdt), eps.to(cdt)
        m0 = _x0(xc, ec, self._rs, self._ss, i, None)
        out = xc * self._c_x[i] + m0 * self._c_m0[i]
        if self.order >= 2:
            m1 = state["m1"]
            out = out + m1 * self._c_m1[i]
            if self.order >= 3:
                m2 = state["m2"]
                out = out + m2 * self._c_m2[i]
                m2.copy_(m1)
            m1.copy_(m0)
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------

SOLVERS = {
    "ddpm": (DDPMSolver, {}),
    "ddim": (DDIMSolver, {}),
    "dpmsolver++": (DPMSolverPP, {}),
    "dpm++2m": (DPMSolverPP, {"solver_order": 2}),
    "dpm++3m": (DPMSolverPP, {"solver_order": 3}),
}


def solver_name(name) -> str:
    """The canonical key of SOLVERS for `name` (case and surrounding blanks ignored), or ArgumentError."""
    return check_choice(name, "solver", sorted(SOLVERS))


def get_solver(name: str, schedule, steps: int, spacing: str | None = None, **kw) -> Solver:
    """Build a solver. ``name``: 'ddpm', 'ddim', 'dpmsolver++' (alias 'dpm++2m'; 'dpm++3m' for order 3),
    in any case. ``schedule``: a Schedule, a name or a preset dict. ``spacing``: None means 'leading' for
    discrete schedules and 'uniform' for continuous ones. Extra keywords go to the solver (eta,
    clip_sample, ...); ``eta`` other than 0 is refused for the solvers that have no eta (DDPM is always
    fully stochastic, DPM-Solver++ deterministic) instead of being dropped."""
    key = solver_name(name)
    cls, defaults = SOLVERS[key]
    if "eta" in kw and cls is not DDIMSolver:
        eta = check_float(kw.pop("eta"), "eta", minimum=0.0, where=key)
        if eta != 0.0:
            raise ArgumentError(f"{key}: eta={eta:g} has no meaning for this solver (only 'ddim' takes eta; "
                                "DDPM is always stochastic, DPM-Solver++ deterministic)")
    import inspect
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "schedule", "steps", "spacing"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ArgumentError(f"{key}: unexpected option(s) {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(allowed))}")
    return cls(schedule, steps, spacing=spacing, **{**defaults, **kw})

"""Noise schedules: the map from schedule time t to (alpha_t, sigma_t), x_t = alpha_t x_0 + sigma_t eps.

Two kinds:
- ``discrete``: T=1000 training steps, integer t in [0, T-1], alphabar = cumprod(1 - beta) (DDPM, DiT,
  DuoDiff, Stable-Diffusion latents). Betas are built in float64; diffusers builds them in float32, which
  moves alphas_cumprod by a few 1e-7 relative (see tests/test_solvers.py).
- ``continuous``: the VP-SDE of the official U-ViT pixel models, t in (0, 1], closed-form alphabar.

The timestep *fed to the network* is a separate convention (``model_time``), part of a model's config:
'int' (t as float), 'frac1000' (t / 1000) for discrete schedules, 'cont999' (t * 999) for continuous.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._validate import ArgumentError, check_choice, check_float, check_int
from ..conventions import TIME_CONVENTIONS, allowed_conventions

__all__ = [
    "Schedule", "DiscreteSchedule", "VPSDESchedule",
    "linear", "scaled_linear", "cosine", "vpsde", "get_schedule",
    "DISCRETE_SPACINGS", "CONTINUOUS_SPACINGS",
]

DISCRETE_SPACINGS = ("leading", "trailing", "linspace")
CONTINUOUS_SPACINGS = ("uniform", "linspace", "logSNR")  # 'linspace' == 'uniform' for continuous time
MODEL_TIME_CONVENTIONS = tuple(TIME_CONVENTIONS)


class Schedule:
    """Base class. ``kind`` is 'discrete' or 'continuous'; ``T`` the largest time (1000 or 1.0)."""

    kind: str
    T: int | float
    name: str
    # Added to t before it is fed to the network: official discrete U-ViT numbers its steps 1..T.
    t_offset: int = 0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alphabar), sqrt(1 - alphabar)) as float64 tensors shaped like t."""
        raise NotImplementedError

    def timesteps(self, steps: int, spacing: str | None = None, **kw) -> torch.Tensor:
        """Descending schedule times at which the network is evaluated (length ``steps``)."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor, convention: str) -> torch.Tensor:
        """Map schedule time to what the network is fed (see module docstring)."""
        if convention not in MODEL_TIME_CONVENTIONS:
            raise ValueError(f"unknown time convention {convention!r}; "
                             f"expected one of {MODEL_TIME_CONVENTIONS}")
        allowed = allowed_conventions(self.kind)
        if convention not in allowed:
            raise ValueError(
                f"time convention {convention!r} does not fit the {self.kind} schedule {self.name!r}; "
                f"use one of {allowed}")
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float32)
        if self.t_offset:
            t = t + self.t_offset
        if convention == "int":
            return t
        if convention == "frac1000":
            return t / 1000
        return t * 999

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t), float64."""
        a, s = self.alpha_sigma(t)
        return torch.log(a) - torch.log(s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, T={self.T})"


# ---------------------------------------------------------------------------------------------------------
# Discrete schedules
# ---------------------------------------------------------------------------------------------------------

class DiscreteSchedule(Schedule):
    """alphabar_t = prod_{s<=t} (1 - beta_s) for integer t in [0, T-1]."""

    kind = "discrete"

    def __init__(self, betas: torch.Tensor, name: str, t_offset: int = 0):
        self.t_offset = int(t_offset)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.name = name
        self.T = int(betas.numel())
        self.betas = betas  # float64 [T]
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64 [T]

    def alpha_sigma(self, t):
        idx = torch.as_tensor(t).to(torch.long)
        # The table lives on the CPU; this is a setup-time helper, not for the sampling loop.
        ac = self.alphas_cumprod[idx.cpu()].to(idx.device)
        return ac.sqrt(), (1.0 - ac).sqrt()

    def timesteps(self, steps: int, spacing: str | None = None, steps_offset: int = 0) -> torch.Tensor:
        """Integer timesteps (int64, descending), identical to diffusers' ``timestep_spacing``.

        'leading': arange(steps) * (T // steps) + steps_offset; 'linspace': round(linspace(0, T-1, steps));
        'trailing': round(arange(T, 0, -T/steps)) - 1. For some step counts (61, 103, ...) diffusers'
        'trailing' float arange yields one extra entry equal to -1; we keep the first ``steps`` entries.
        """
        spacing = "leading" if spacing is None else check_choice(spacing, "spacing", DISCRETE_SPACINGS)
        T = self.T
        steps = check_int(steps, "steps", minimum=1, maximum=T)
        steps_offset = check_int(steps_offset, "steps_offset", minimum=0)
        if spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[:steps] - 1
        else:
            raise ValueError(f"unknown spacing {spacing!r} for a discrete schedule; expected one of "
                             f"{DISCRETE_SPACINGS}")
        if ts.max() > T - 1 or ts.min() < 0:
            raise ValueError(f"timesteps out of [0, {T - 1}] (steps={steps}, spacing={spacing!r}, "
                             f"steps_offset={steps_offset})")
        return torch.from_numpy(ts.copy())


def _check_betas(name, T, beta_start, beta_end, t_offset):
    T = check_int(T, "T", minimum=1, where=name)
    lo = check_float(beta_start, "beta_start", minimum=0.0, maximum=1.0, exclusive_minimum=True, where=name)
    hi = check_float(beta_end, "beta_end", minimum=lo, maximum=1.0, where=name)
    if hi >= 1.0:
        raise ArgumentError(f"{name}: beta_end must be < 1, got {hi:g}")
    return T, lo, hi, check_int(t_offset, "t_offset", minimum=0, where=name)


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, t_offset: int = 0) -> DiscreteSchedule:
    """DDPM linear betas (DDPM, DiT, DuoDiff)."""
    T, beta_start, beta_end, t_offset = _check_betas("linear", T, beta_start, beta_end, t_offset)
    return DiscreteSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear", t_offset)


def scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                  t_offset: int = 0) -> DiscreteSchedule:
    """Linear in sqrt(beta) (Stable Diffusion / U-ViT latent models, diffusers 'scaled_linear')."""
    T, beta_start, beta_end, t_offset = _check_betas("scaled_linear", T, beta_start, beta_end, t_offset)
    b = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return DiscreteSchedule(b, "scaled_linear", t_offset)


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999, t_offset: int = 0) -> DiscreteSchedule:
    """Nichol & Dhariwal cosine alphabar; betas clipped at ``max_beta`` (diffusers 'squaredcos_cap_v2')."""
    T = check_int(T, "T", minimum=1, where="cosine")
    s = check_float(s, "s", minimum=0.0, where="cosine")
    max_beta = check_float(max_beta, "max_beta", minimum=0.0, maximum=1.0, exclusive_minimum=True,
                           where="cosine")
    if max_beta >= 1.0:
        raise ArgumentError(f"cosine: max_beta must be < 1, got {max_beta:g}")
    t_offset = check_int(t_offset, "t_offset", minimum=0, where="cosine")

    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    b = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
    return DiscreteSchedule(torch.tensor(b, dtype=torch.float64), "cosine", t_offset)


# ---------------------------------------------------------------------------------------------------------
# Continuous VP-SDE
# ---------------------------------------------------------------------------------------------------------

class VPSDESchedule(Schedule):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in (0, 1]:
    log alphabar(t) = -t^2 (beta_max - beta_min) / 2 - t beta_min."""

    kind = "continuous"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3):
        beta_min = check_float(beta_min, "beta_min", minimum=0.0, where="vpsde")
        beta_max = check_float(beta_max, "beta_max", minimum=beta_min, exclusive_minimum=True, where="vpsde")
        eps = check_float(eps, "eps", minimum=0.0, maximum=1.0, exclusive_minimum=True, where="vpsde")
        if eps >= 1.0:
            raise ArgumentError(f"vpsde: eps must be < 1, got {eps:g}")
        self.name = "vpsde"
        self.T = 1.0
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.eps = float(eps)  # smallest time the sampler evaluates the network at

    def log_alphabar(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return -0.5 * t * t * (self.beta_max - self.beta_min) - t * self.beta_min

    def alpha_sigma(self, t):
        la = self.log_alphabar(t)
        # expm1 keeps sigma accurate at tiny t, where 1 - exp(la) cancels.
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of ``log_snr``: solve (bmax-bmin)/2 t^2 + bmin t = log(1 + exp(-2 lambda))."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        L = torch.nn.functional.softplus(-2.0 * lam)  # -log alphabar
        d = self.beta_max - self.beta_min
        # Stable root of d/2 t^2 + bmin t - L = 0 (no cancellation when bmin^2 >> 2 d L).
        return 2.0 * L / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * d * L))

    def timesteps(self, steps: int, spacing: str | None = None, eps: float | None = None) -> torch.Tensor:
        """Float64 times, descending from 1 to ``eps`` inclusive (``steps`` points).

        'uniform' (alias 'linspace'): linspace(1, eps, steps); 'logSNR': uniform in lambda between
        lambda(1) and lambda(eps). The solvers take their last step from t=eps to clean data (sigma=0).
        """
        spacing = "uniform" if spacing is None else check_choice(spacing, "spacing", CONTINUOUS_SPACINGS,
                                                                 case_insensitive=False)
        eps = self.eps if eps is None else check_float(eps, "eps", minimum=0.0, maximum=1.0,
                                                       exclusive_minimum=True)
        steps = check_int(steps, "steps", minimum=1)
        if eps >= 1:
            raise ArgumentError(f"eps must be in (0, 1), got {eps}")
        if steps == 1:
            return torch.ones(1, dtype=torch.float64)
        if spacing in ("uniform", "linspace"):
            return torch.linspace(1.0, eps, steps, dtype=torch.float64)
        if spacing == "logSNR":
            lam = torch.linspace(float(self.log_snr(torch.tensor(1.0, dtype=torch.float64))),
                                 float(self.log_snr(torch.tensor(eps, dtype=torch.float64))),
                                 steps, dtype=torch.float64)
            ts = self.t_from_log_snr(lam)
            ts[0], ts[-1] = 1.0, eps  # pin the ends exactly
            return ts
        raise ValueError(f"unknown spacing {spacing!r} for a continuous schedule; expected one of "
                         f"{CONTINUOUS_SPACINGS}")


def vpsde(beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3) -> VPSDESchedule:
    """Continuous VP-SDE of the official U-ViT pixel checkpoints (network fed t * 999)."""
    return VPSDESchedule(beta_min, beta_max, eps)


_FACTORIES = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": cosine,
    "squaredcos_cap_v2": cosine,
    "vpsde": vpsde,
}


def get_schedule(name_or_dict, **kw) -> Schedule:
    """Build a schedule from a name ('linear', 'scaled_linear', 'cosine', 'vpsde'), a dict
    ``{'name': ..., **kwargs}`` (the form model presets use), or return a Schedule unchanged."""
    if isinstance(name_or_dict, Schedule):
        if kw:
            raise ArgumentError("keyword arguments given with an already built Schedule")
        return name_or_dict
    if isinstance(name_or_dict, dict):
        cfg = dict(name_or_dict)
        if "name" not in cfg:
            raise ArgumentError(f"schedule dict needs a 'name' key, got {sorted(cfg)}")
        name = cfg.pop("name")
        cfg.update(kw)
    else:
        name, cfg = name_or_dict, kw
    name = check_choice(name, "schedule", sorted(_FACTORIES))
    factory = _FACTORIES[name]
    import inspect
    allowed = set(inspect.signature(factory).parameters)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ArgumentError(f"schedule {name!r}: unexpected parameter(s) {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(allowed))}")
    return factory(**cfg)

"""Early-exit sampling (the AdaDiff / DeeDiff baseline), its phase-transition profile, and the choice of a
DuoDiff switch point.

`EarlyExitSampler(model, threshold, mode)` samples with an `EarlyExitModel`. At each step the backbone's
blocks run one at a time; before block i the exit-i score is computed and compared with the threshold
(`models.exits.passes`: uncertainty u <= threshold for 'duodiff', confidence c >= threshold for 'adadiff';
the boundary exits):
- mode='batch': the whole batch stops at the first i where every sample passes, and the exit-i head gives
  every sample's eps; the remaining blocks are not run (the compute really saved, measured in wall clock);
- mode='per_sample': every block runs; each sample takes its eps from its own first passing exit (or the
  full depth). No compute is saved; it shows what per-sample exits would give.
Both record the exit layer (blocks run, 1..depth) of every sample at every step in `trace.exits`
([steps, n] int). Deciding needs the score on the host: one sync per probed block, the data-dependent
control flow that DuoDiff's static schedule avoids.

`profile_exits` runs the per-sample sampler at several thresholds and writes the phase-transition plot
(mean exit layer with its spread against the sampling step, one curve per threshold) and exits.json.
`calibrate_switch` sweeps DuoDiff switch points on a calibration batch, measures fidelity to deep-only
sampling from the same noise and the speed-up, and picks the largest shallow share within a tolerance.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .. import _io
from .._validate import ArgumentError, check_choice, check_float, check_int
from ..models.exits import EarlyExitModel, passes
from .duo import DuoSampler, SampleTrace

__all__ = ["EarlyExitSampler", "profile_exits", "calibrate_switch", "suggest_switch_from_profile",
           "DEFAULT_THRESHOLDS", "DEFAULT_TOLERANCE_DB"]


class EarlyExitSampler(DuoSampler):
    """Sample with early exits from an `EarlyExitModel` (see the module docstring).

    Takes DuoSampler's keywords (schedule, solver, steps, cfg_scale, dtype, spacing, eta, clip_sample,
    progress) except `switch` and `cuda_graphs` (exits are data dependent: eager only).
    """

    def __init__(self, model: EarlyExitModel, threshold: float, mode: str = "batch", **kw):
        if not isinstance(model, EarlyExitModel):
            raise ArgumentError(f"EarlyExitSampler needs an EarlyExitModel (models.exits), got "
                                f"{type(model).__name__}")
        for bad in ("switch", "cuda_graphs", "shallow_cfg_scale"):
            if bad in kw:
                raise ArgumentError(f"EarlyExitSampler: {bad} does not apply (exits are decided per step, eagerly)")
        self.mode = check_choice(mode, "mode", ("batch", "per_sample"), where="EarlyExitSampler")
        self.threshold = check_float(threshold, "threshold", minimum=0.0, maximum=1.0, where="EarlyExitSampler")
        self.model = model
        super().__init__(model, model, switch=0.0, cuda_graphs=False, **kw)
        self.depth = model.num_blocks

    # The denoiser of every step: blocks one by one, with the exit decision.
    def _eps_with_exits(self, x, t, y):
        m = self.model
        B = x.shape[0]
        xin = x.to(self.dtype)
        guided = self.guided  # one scale here (shallow_cfg_scale is refused): cfg_scale guides
        if guided:
            xin = torch.cat([xin, xin])
        tt = t.expand(xin.shape[0])
        tok = m.backbone.embed(xin, tt, y) if y is not None or m.family == "dit" else m.backbone.embed(xin, tt)
        n = xin.shape[0]
        exit_at = torch.full((n,), self.depth, dtype=torch.long)
        eps = None
        chosen = torch.zeros(n, dtype=torch.bool)
        for step in m.backbone.iter_blocks(tok):
            i = step.index
            if i in m.exits:
                score = m.score(i, step.x)
                ok = passes(m.variant, score, self.threshold).cpu()  # the host sync that exits need
                if self.mode == "batch":
                    if bool(ok.all()):
                        exit_at[:] = i
                        eps = m.exit_output(i, step.x).float()
                        break
                else:
                    new = ok & ~chosen
                    if bool(new.any()):
                        out_i = m.exit_output(i, step.x).float()
                        eps = out_i.clone() if eps is None else eps
                        idx = new.nonzero().flatten().to(out_i.device)
                        eps[idx] = out_i[idx]
                        exit_at[new] = i
                        chosen |= new
            last = step
        if self.mode == "batch" and eps is None or self.mode == "per_sample" and not bool(chosen.all()):
            full = m.final_output(last).float()
            if eps is None:
                eps = full
            else:
                rest = (~chosen).nonzero().flatten().to(full.device)
                eps[rest] = full[rest]
        if guided:
            cond, uncond = eps[:B], eps[B:]
            g = self.cfg_channels or self.in_channels
            eps = torch.cat([uncond[:, :g] + self.cfg_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)
            exit_at = torch.maximum(exit_at[:B], exit_at[B:])
        return eps, exit_at

    def _sample(self, n, noise, y, generator):
        from .segments import draw_step_noise
        x, y = self._inputs(n, noise, y, generator)
        step_noise = draw_step_noise(self.solver, tuple(x.shape), generator, self.device)
        state = self.solver.init_state(x)
        y_in = self._model_labels(y)
        exits = torch.zeros(self.steps, x.shape[0], dtype=torch.long)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.steps, desc="early-exit sampling", unit="step", leave=False)
        self._sync()
        t0 = time.perf_counter()
        for i in range(self.steps):
            eps, exit_at = self._eps_with_exits(x, self._model_times[i], y_in)
            x = self.solver.step(state, i, x, eps, noise=step_noise[i])
            exits[i] = exit_at
            if bar is not None:
                bar.update(1)
        self._sync()
        if bar is not None:
            bar.close()
        trace = SampleTrace(seconds={"deep": time.perf_counter() - t0})
        trace.models = ["early-exit"] * self.steps
        trace.timesteps = list(self._timesteps_host)
        trace.total_seconds = trace.seconds["deep"]
        trace.exits = exits  # [steps, n]: blocks run per sample and step (depth = no exit)
        self.trace = trace
        return x

    def compute_fraction(self) -> float:
        """Blocks run in the last sample() over blocks of full-depth sampling (probes and heads not counted)."""
        ex = getattr(self.trace, "exits", None)
        if ex is None:
            raise ArgumentError("compute_fraction of an EarlyExitSampler is known after sample()")
        if self.mode == "per_sample":
            return 1.0  # every block runs for every sample
        return float(ex.float().mean() / self.depth)


# --------------------------------------------------------------------------------------------------------
# The phase-transition profile
# --------------------------------------------------------------------------------------------------------

def profile_exits(model: EarlyExitModel, thresholds=(0.05, 0.1), *, n=64, steps=25, solver="ddim", seed=0,
                  out=None, labels=None, **sampler_kw) -> dict:
    """Exit layers per sampling step at each threshold (per-sample mode, so nothing is cut short).

    Returns {'depth', 'variant', 'rule', 'profiles': [{'threshold', 'timesteps', 'mean_exit', 'std_exit',
    'quantiles'}]}; with `out`, writes `exits.json` and `exits.png` there (atomically)."""
    n = check_int(n, "n", minimum=1, where="profile_exits")
    if isinstance(thresholds, (int, float)):
        thresholds = [thresholds]
    thresholds = [check_float(t, "threshold", minimum=0.0, maximum=1.0, where="profile_exits") for t in thresholds]
    if not thresholds:
        raise ArgumentError("profile_exits: give at least one threshold")
    profiles = []
    for thr in thresholds:
        smp = EarlyExitSampler(model, thr, mode="per_sample", solver=solver, steps=steps, **sampler_kw)
        y = None
        if smp.num_classes:
            y = labels if labels is not None else torch.arange(n) % smp.label_range()
        smp.sample(n=n, y=y, generator=torch.Generator().manual_seed(seed))
        ex = smp.trace.exits.double()  # (steps, n)
        profiles.append(dict(threshold=thr, timesteps=smp.trace.timesteps, mean_exit=ex.mean(1).tolist(),
                             std_exit=ex.std(1, unbiased=False).tolist(),
                             q10=ex.quantile(0.1, dim=1).tolist(), q90=ex.quantile(0.9, dim=1).tolist()))
    from ..models.exits import EXIT_RULES
    result = dict(depth=model.num_blocks, variant=model.variant, rule=EXIT_RULES[model.variant], n=n, steps=steps,
                  solver=solver, profiles=profiles,
                  # flat form, one entry per step, of the first threshold (what most readers want)
                  timesteps=profiles[0]["timesteps"], mean_exit=profiles[0]["mean_exit"],
                  std_exit=profiles[0]["std_exit"], threshold=[profiles[0]["threshold"]] * steps)
    return _write(result, out, "exits", plot_profile)


def plot_profile(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, p in enumerate(result["profiles"]):
        steps = np.arange(1, len(p["mean_exit"]) + 1)
        mean, std = np.asarray(p["mean_exit"]), np.asarray(p["std_exit"])
        ax.plot(steps, mean, "-", color=f"C{k}", label=f"threshold {p['threshold']:g}")
        ax.fill_between(steps, mean - std, mean + std, color=f"C{k}", alpha=0.2)
    ax.axhline(result["depth"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("sampling step (first = noisiest)")
    ax.set_ylabel("exit layer (blocks run)")
    ax.set_ylim(0, result["depth"] + 0.5)
    ax.set_title(f"phase transition: mean exit layer ± std ({result['variant']}: {result['rule']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _io.savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def suggest_switch_from_profile(profile: dict, shallow_depth: int = 3, threshold_index: int = 0) -> float:
    """The share of leading steps whose mean exit layer stays within the shallow model's depth: DuoDiff's
    reading of the phase transition (a 3-block model can do every step early exit ends by block 3)."""
    mean = profile["profiles"][threshold_index]["mean_exit"]
    k = 0
    while k < len(mean) and mean[k] <= shallow_depth:
        k += 1
    return k / len(mean)


# --------------------------------------------------------------------------------------------------------
# Switch calibration
# --------------------------------------------------------------------------------------------------------

# Default thresholds of `duodiff-fast profile` per exit variant, the first also what `calibrate` profiles for its
# suggestion and the flat fields of exits.json describe (README, "Measured on the shipped demo pair").
DEFAULT_THRESHOLDS = {"duodiff": (0.3, 0.4), "adadiff": (0.7, 0.6)}

# The one default fidelity tolerance of calibrate_switch and `duodiff-fast calibrate`, set on the shipped pairs:
# `calibrate --demo` (64 samples, no guidance) measures 24.7 dB at 0.4 and 23.7 dB at 0.5 on the shipped pair
# (24.6 / 23.8 on the previous one), and 24.2 dB lies halfway. In the 1,000-sample quality runs 0.4 kept
# deep-only's class accuracy within 3 points (-2.1 [-3.8, -0.4]; the previous pair -1.7 [-3.7, +0.1]), and
# 0.6 was no better (-2.2 [-4.1, -0.2]). README, "Choosing a switch"; bench/results/demo_2026-12-03d_n1000_cpu
# and calibrate_2026-12-03d_cpu. It was 25.5 dB for an earlier deep model and 20 dB for the companion before
# that: the number belongs to a pair, and a new pair should set it from its own quality run.
DEFAULT_TOLERANCE_DB = 24.2


def calibrate_switch(shallow, deep, *, switches=None, n=32, steps=25, solver="ddim",
                     tolerance_db=DEFAULT_TOLERANCE_DB, seed=0,
                     profile=None, out=None, **sampler_kw) -> dict:
    """Sweep DuoDiff switch points and pick the largest shallow share whose samples stay within a fidelity
    tolerance of deep-only sampling from the same noise.

    Fidelity is the PSNR (dB, images on [-1, 1] with peak-to-peak 2; see eval.fidelity) of each switch's
    samples against deep-only ones; the chosen switch is the largest share with PSNR >= tolerance_db.
    Speed-up is measured (wall clock of the same calibration batch) and theoretical (block count). With an
    early-exit `profile` (from profile_exits) the switch it suggests is reported too. Writes calibrate.json
    and calibrate.png to `out`. Returns the sweep and the choice."""
    from ..eval import fidelity
    switches = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0] if switches is None else list(switches)
    switches = sorted({check_float(s, "switches", minimum=0.0, maximum=1.0, where="calibrate_switch")
                       for s in switches} | {0.0})
    tolerance_db = check_float(tolerance_db, "tolerance_db", minimum=0.0, where="calibrate_switch")
    n = check_int(n, "n", minimum=1, where="calibrate_switch")
    try:
        ref = DuoSampler(shallow, deep, solver=solver, steps=steps, switch=0.0, **sampler_kw)
    except ArgumentError as e:  # a pair that cannot share a schedule: say who was asked
        raise ArgumentError(f"calibrate_switch: {e}") from None
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, ref.in_channels, ref.img_size, ref.img_size, generator=g)
    y = torch.arange(n) % ref.label_range() if ref.num_classes else None
    rows = []
    deep_images = None
    for s in switches:
        smp = DuoSampler(shallow, deep, solver=solver, steps=steps, switch=s, **sampler_kw)
        smp.sample(noise=noise[:1], y=None if y is None else y[:1])  # warm-up outside the clock
        t0 = time.perf_counter()
        x = smp.sample(noise=noise, y=y).cpu().clamp(-1, 1)
        sec = time.perf_counter() - t0
        if s == 0.0:
            deep_images, base = x, sec
        f = fidelity(x, deep_images) if s > 0 else dict(psnr=float("inf"), mse=0.0)
        rows.append(dict(switch=s, shallow_steps=smp.k, steps=steps, seconds=sec, speedup=base / sec,
                         theoretical_speedup=1.0 / smp.compute_fraction(), psnr_vs_deep=f["psnr"],
                         mse_vs_deep=f["mse"]))
    ok = [r for r in rows if r["psnr_vs_deep"] >= tolerance_db]
    chosen = max(ok, key=lambda r: r["switch"]) if ok else rows[0]
    result = dict(rows=rows, tolerance_db=tolerance_db, chosen_switch=chosen["switch"],
                  chosen=chosen, n=n, steps=steps, solver=solver)
    if profile is not None:
        result["profile_switch"] = suggest_switch_from_profile(profile, getattr(shallow, "num_blocks", 3))
    return _write(result, out, "calibrate", _plot_calibration)


def _write(result, out, stem, plot):
    """`out/<stem>.json` and `out/<stem>.png` (atomically) when `out` is given; returns `result`."""
    if out is not None:
        _io.write_json(os.path.join(out, f"{stem}.json"), result)
        plot(result, os.path.join(out, f"{stem}.png"))
    return result


def _plot_calibration(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["switch"] > 0]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    ax.plot([r["speedup"] for r in rows], [r["psnr_vs_deep"] for r in rows], "o-", label="measured speed-up")
    ax.plot([r["theoretical_speedup"] for r in rows], [r["psnr_vs_deep"] for r in rows], "x--", alpha=0.6,
            label="theoretical speed-up")
    for r in rows:
        ax.annotate(f"{r['switch']:g}", (r["speedup"], r["psnr_vs_deep"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(result["tolerance_db"], color="gray", ls=":", lw=0.8)
    c = result["chosen"]
    if c["switch"] > 0:
        ax.plot([c["speedup"]], [c["psnr_vs_deep"]], "r*", ms=12, label=f"chosen switch {c['switch']:g}")
    ax.set_xlabel("speed-up over deep-only")
    ax.set_ylabel("PSNR vs deep-only, same noise (dB)")
    ax.set_title("DuoDiff switch calibration", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _io.savefig(fig, path, dpi=110)
    plt.close(fig)

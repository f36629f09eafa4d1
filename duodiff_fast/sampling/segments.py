"""A sampler is a list of segments: (model, range of steps). One function runs a segment.

`run_segment` is the unit that eager sampling runs and that CUDA Graphs capture (`graphs.py`): it
takes the state x, the solver's state dict, device-resident model times (one float32 entry per step),
the labels and pre-drawn noise, and loops over its steps with nothing but tensor work. No `.item()`,
no `float(t)`, no host-to-device copy, no random number drawn inside: everything that varies per step
is indexed out of device tensors filled before the loop, so the loop can run under
`torch.cuda.set_sync_debug_mode("error")` and be captured as a graph.

`Denoiser` is one network evaluation with classifier-free guidance folded in: the batch is doubled
with the null label, and the first `cfg_channels` output channels are guided
(`uncond + w (cond - uncond)`, diffusers' convention) while the remaining eps channels keep the
conditional prediction, as DiT's `forward_with_cfg` does for its 4th latent channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["Segment", "Denoiser", "run_segment", "draw_step_noise", "plan_segments", "guides"]


def guides(cfg_scale) -> bool:
    """Whether a guidance scale needs the unconditional branch (None and 1 do not)."""
    return cfg_scale is not None and cfg_scale != 1.0


@dataclass(frozen=True)
class Segment:
    """Steps `[start, stop)` of a sampling run, all evaluated by `model` (called `name` in traces)."""
    name: str
    model: nn.Module
    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def plan_segments(models: dict, shallow_steps: int, steps: int) -> list[Segment]:
    """[shallow for steps [0, k), deep for [k, N)], dropping empty segments."""
    segs = [Segment("shallow", models["shallow"], 0, shallow_steps),
            Segment("deep", models["deep"], shallow_steps, steps)]
    return [s for s in segs if len(s)]


class Denoiser:
    """eps(x, t, y) of one model in float32, with guidance when `cfg_scale` is set.

    x is the float32 solver state; the network runs in `dtype`. With guidance, `y` must already be
    the doubled label batch `[labels, null labels]` (built once per run, not per step) and the network
    sees `[x, x]`. `cfg_channels=None` guides every eps channel. `doubled_labels=True` says `y` is that
    doubled batch even when this denoiser does not guide (another segment of the run does): it then reads
    the first half.
    """

    def __init__(self, model: nn.Module, in_channels: int, dtype: torch.dtype, cfg_scale: float | None = None,
                 cfg_channels: int | None = None, doubled_labels: bool | None = None):
        self.model = model
        self.in_channels = int(in_channels)
        self.dtype = dtype
        self.cfg_scale = cfg_scale
        self.guided = guides(cfg_scale)
        c = self.in_channels if cfg_channels is None else min(int(cfg_channels), self.in_channels)
        self.cfg_channels = c
        self.doubled_labels = self.guided if doubled_labels is None else bool(doubled_labels)
        if self.guided and not self.doubled_labels:
            raise ValueError("Denoiser: guidance needs the doubled label batch (doubled_labels=True)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        xin = x.to(self.dtype)
        C = self.in_channels
        if self.guided:
            tt = t.expand(2 * B)
            out = self.model(torch.cat([xin, xin]), tt, y)[:, :C].float()  # (2B, C, H, W)
            cond, uncond = out[:B], out[B:]
            if self.cfg_channels == C:
                return uncond + self.cfg_scale * (cond - uncond)
            g = self.cfg_channels
            guided = uncond[:, :g] + self.cfg_scale * (cond[:, :g] - uncond[:, :g])
            return torch.cat([guided, cond[:, g:]], dim=1)
        tt = t.expand(B)
        if y is not None and self.doubled_labels:
            y = y[:B]  # the conditional half
        out = self.model(xin, tt, y) if y is not None else self.model(xin, tt)
        return out[:, :C].float()


def draw_step_noise(solver, shape, generator, device, steps=None) -> list:
    """Per-step noise for every step of `steps` (default all) that needs it, drawn in step order with one
    `randn` call per step (the same calls, in the same order, as drawing it inside the loop), then moved
    to `device` in one copy. Returns a list indexed by step: a tensor or None."""
    steps = range(len(solver.timesteps)) if steps is None else steps
    need = [i for i in steps if solver.needs_noise(i)]
    out = [None] * len(solver.timesteps)
    if not need:
        return out
    gdev = generator.device if generator is not None else device
    buf = torch.empty((len(need), *shape), dtype=torch.float32, device=gdev)
    for j in range(len(need)):
        torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32, out=buf[j])
    buf = buf.to(device)
    for j, i in enumerate(need):
        out[i] = buf[j]
    return out


def run_segment(denoise, solver, state: dict, x: torch.Tensor, start: int, stop: int,
                model_times: torch.Tensor, y: torch.Tensor | None, noise: list, on_step=None) -> torch.Tensor:
    """Steps `[start, stop)`: `x <- solver.step(state, i, x, denoise(x, model_times[i], y), noise[i])`.

    `model_times` is a float32 device tensor with one entry per step; `noise[i]` a pre-drawn tensor where
    `solver.needs_noise(i)`. `on_step(i)` (a progress bar, say) must not touch tensor values.
    """
    for i in range(start, stop):
        eps = denoise(x, model_times[i], y)
        x = solver.step(state, i, x, eps, noise=noise[i])
        if on_step is not None:
            on_step(i)
    return x

"""Sampling is built from segments; one function runs a segment with no host sync, no host-to-device copy
and no random draw inside its loop (what CUDA-graph capture needs), and its result equals the step-by-step
loop that draws noise inside (the random stream is unchanged)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from duodiff_fast.models import create_model
from duodiff_fast.sampling import DuoSampler
from duodiff_fast.sampling.segments import Denoiser, draw_step_noise, plan_segments, run_segment

from .test_duo import SCHED, ToyDenoiser, manual_loop

FORBIDDEN = ("_local_scalar_dense", "normal", "random", "uniform", "bernoulli", "randn", "rand", "randint",
             "_to_copy_cross_device")


class Guard(TorchDispatchMode):
    """Fails on any op that would sync with the host or draw random numbers; records what ran."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.ops.append(name)
        base = name.split(".")[0]
        if base in FORBIDDEN or "random" in base or base.startswith("normal"):
            raise AssertionError(f"{name} inside a segment loop (host sync or RNG)")
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, torch.Tensor) and a.device.type != "cpu" and name.startswith("_to_copy"):
                raise AssertionError(f"{name}: a device copy inside the loop")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmsolver++"])
def test_run_segment_has_no_sync_and_no_rng(solver):
    shallow, deep = ToyDenoiser(1, num_classes=4), ToyDenoiser(2, num_classes=4)
    kw = dict(eta=0.5) if solver == "ddim" else {}
    s = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=6, switch=0.5, cfg_scale=2.0, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.tensor([1, 3])
    noise = draw_step_noise(s.solver, tuple(x.shape), g, s.device)
    state = s.solver.init_state(x)
    y_in = torch.cat([y, torch.full_like(y, deep.null_class)])
    guard = Guard()
    with torch.inference_mode(), guard:
        for seg in s.segments:
            x = run_segment(s.denoiser(seg.model), s.solver, state, x, seg.start, seg.stop, s._model_times, y_in,
                            noise)
    assert len(guard.ops) > 20 and torch.isfinite(x).all()


def test_pre_drawn_noise_keeps_the_random_stream_of_drawing_inside_the_loop():
    shallow, deep = ToyDenoiser(1), ToyDenoiser(2)
    for solver, kw in (("ddpm", {}), ("ddim", {"eta": 0.8})):
        got = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=7, switch=0, **kw).sample(
            n=3, generator=torch.Generator().manual_seed(11))
        from duodiff_fast.sampling import get_solver
        g = torch.Generator().manual_seed(11)
        x = torch.randn(3, 3, 8, 8, generator=g)
        want = manual_loop(deep, get_solver(solver, SCHED, 7, **kw), SCHED, x, generator=g)
        assert torch.equal(got, want), solver


def test_segments_plan():
    a, b = ToyDenoiser(1), ToyDenoiser(2)
    assert [(s.name, s.start, s.stop) for s in plan_segments({"shallow": a, "deep": b}, 3, 10)] == \
        [("shallow", 0, 3), ("deep", 3, 10)]
    assert [s.name for s in plan_segments({"shallow": a, "deep": b}, 0, 10)] == ["deep"]
    assert [s.name for s in plan_segments({"shallow": a, "deep": b}, 10, 10)] == ["shallow"]
    s = DuoSampler(a, b, schedule=SCHED, steps=10, switch=0.3)
    assert [(g.name, g.start, g.stop, g.model) for g in s.segments] == [("shallow", 0, 3, a), ("deep", 3, 10, b)]


def test_denoiser_on_a_real_model_matches_forward():
    torch.manual_seed(0)
    m = create_model({"family": "uvit", "kwargs": dict(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2,
                                                       num_classes=5), "time_convention": "frac1000",
                      "schedule": {"name": "linear"}}).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor(0.25)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        want = m(x, t.expand(2), y)
        got = Denoiser(m, 3, torch.float32)(x, t, y)
    assert torch.equal(got, want.float())

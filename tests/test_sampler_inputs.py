"""Every public sampling entry point refuses bad input with a message naming the argument and the value,
and accepts NumPy scalars wherever it accepts Python numbers."""
import numpy as np
import pytest
import torch

from duodiff_fast.models import create_model
from duodiff_fast.sampling import AtTimestep, DuoSampler, get_schedule, get_solver

from .test_duo import SCHED, ToyDenoiser


def pair(**kw):
    return ToyDenoiser(1, **kw), ToyDenoiser(2, **kw)


def make(**kw):
    kw.setdefault("steps", 4)
    return DuoSampler(*pair(), schedule=SCHED, **kw)


@pytest.mark.parametrize("kw,text", [
    (dict(steps=2.5), "steps"), (dict(steps="4"), "steps"), (dict(steps=True), "steps"), (dict(steps=0), "steps"),
    (dict(steps=1001), "steps"), (dict(switch=1.5), "switch"), (dict(switch=-0.1), "switch"),
    (dict(switch=AtTimestep(5000)), "5000"), (dict(switch=AtTimestep(-3)), "-3"), (dict(switch=5000), "5000"),
    (dict(switch="0.3"), "switch"), (dict(switch=True), "bool"), (dict(switch=float("nan")), "switch"),
    (dict(solver="euler"), "solver"), (dict(solver=3), "solver"), (dict(eta=-0.5), "eta"),
    (dict(eta=float("nan")), "eta"), (dict(solver="ddpm", eta=0.5), "eta"),
    (dict(solver="dpmsolver++", eta=1.0), "eta"), (dict(clip_sample=0), "clip_sample"),
    (dict(clip_sample=-1.0), "clip_sample"), (dict(cuda_graphs="yes"), "cuda_graphs"),
    (dict(cuda_graphs=True), "cuda_graphs"), (dict(dtype="bf16"), "dtype"), (dict(progress="no"), "progress"),
    (dict(spacing="karras"), "spacing"),
])
def test_constructor_refuses(kw, text):
    with pytest.raises(ValueError, match=text) as e:
        make(**kw)
    print(e.value)


def test_absolute_switch_outside_a_continuous_schedule_is_refused():
    s, d = ToyDenoiser(1, time_convention="cont999"), ToyDenoiser(2, time_convention="cont999")
    with pytest.raises(ValueError, match=r"AtTimestep\(600\).*outside") as e:
        DuoSampler(s, d, schedule=get_schedule("vpsde"), steps=4, switch=AtTimestep(600))
    assert "[0, 1]" in str(e.value)
    ok = DuoSampler(s, d, schedule=get_schedule("vpsde"), steps=4, switch=AtTimestep(0.5))
    assert 0 < ok.k < 4


def test_guidance_scale_is_checked():
    s, d = pair(num_classes=5)
    for bad in (-1.0, float("nan"), float("inf"), "4"):
        with pytest.raises(ValueError, match="cfg_scale"):
            DuoSampler(s, d, schedule=SCHED, steps=2, cfg_scale=bad)
    assert DuoSampler(s, d, schedule=SCHED, steps=2, cfg_scale=np.float32(2.0)).cfg_scale == 2.0
    assert DuoSampler(s, d, schedule=SCHED, steps=2, cfg_scale=0).cfg_scale == 0.0  # unconditional
    with pytest.raises(ValueError, match="cfg_channels"):
        DuoSampler(s, d, schedule=SCHED, steps=2, cfg_scale=2.0, cfg_channels=4)


def test_mismatched_schedules_and_null_classes_are_refused():
    kw = dict(img_size=8, patch_size=2, embed_dim=32, num_heads=2, num_classes=0)
    spec = {"family": "uvit", "kwargs": dict(kw, depth=3), "time_convention": "frac1000",
            "schedule": {"name": "linear"}}
    a = create_model(spec)
    b = create_model(dict(spec, schedule={"name": "scaled_linear"}))
    with pytest.raises(ValueError, match="different noise schedules"):
        DuoSampler(a, b, steps=2)
    # Same schedule spelled differently is fine.
    c = create_model(dict(spec, schedule={"name": "linear", "beta_start": 1e-4, "beta_end": 0.02, "T": 1000}))
    DuoSampler(a, c, steps=2)
    s, d = pair(num_classes=5)
    d.null_class = 4
    with pytest.raises(ValueError, match="null_class"):
        DuoSampler(s, d, schedule=SCHED, steps=2)


def test_solver_names_ignore_case_and_keep_eta():
    lo = make(solver="ddim", eta=0.7)
    up = make(solver="DDIM", eta=0.7)
    assert up.solver_name == "ddim" and up.solver.eta == lo.solver.eta == 0.7
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = lo.sample(noise=noise, generator=torch.Generator().manual_seed(1))
    b = up.sample(noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert get_solver(" DPMSolver++ ", SCHED, 4).order == 2
    with pytest.raises(ValueError, match="eta"):
        get_solver("ddpm", SCHED, 4, eta=0.3)


@pytest.mark.parametrize("kw,text", [
    (dict(n=2.7), "n"), (dict(n="4"), "n"), (dict(n=True), "n"), (dict(n=0), "n"), (dict(n=-2), "n"),
    (dict(noise=torch.zeros(0, 3, 8, 8)), "no samples"),
    (dict(noise=torch.full((2, 3, 8, 8), float("nan"))), "NaN"),
    (dict(noise=torch.tensor([[[[float("inf")]]]]).expand(1, 3, 8, 8).clone()), "NaN or infinite"),
    (dict(noise=torch.zeros(2, 3, 8, 8, dtype=torch.int64)), "floating"),
    (dict(noise=np.zeros((2, 3, 8, 8), np.float32)), "noise"),
    (dict(n=2, generator="seed"), "generator"),
])
def test_sample_refuses(kw, text):
    s = make()
    with pytest.raises(ValueError, match=text) as e:
        s.sample(**kw)
    print(e.value)


def test_numpy_scalars_are_numbers_and_labels_may_be_numpy():
    s, d = pair(num_classes=5)
    smp = DuoSampler(s, d, schedule=SCHED, steps=np.int64(4), switch=np.float64(0.5), eta=np.float32(0.0))
    assert smp.steps == 4 and smp.k == 2
    x = smp.sample(n=np.int32(2), y=np.array([1, 3]), generator=torch.Generator().manual_seed(0))
    y = smp.sample(n=2, y=torch.tensor([1, 3]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="integer class labels"):
        smp.sample(n=2, y=np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="integer class labels"):
        smp.sample(n=2, y=torch.tensor([True, False]))


def test_sample_returns_an_ordinary_tensor():
    x = make().sample(n=2, generator=torch.Generator().manual_seed(0))
    assert not x.is_inference()
    x.mul_(2)  # in place: must not raise
    x.requires_grad_(True)


def test_noise_is_not_modified_and_result_is_finite():
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    keep = noise.clone()
    x = make(solver="ddpm").sample(noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, keep) and torch.isfinite(x).all()


@pytest.mark.parametrize("bad,text", [
    (dict(name="linear", beta_start=0.0), "beta_start"), (dict(name="linear", beta_end=1.5), "beta_end"),
    (dict(name="linear", beta_start=0.1, beta_end=0.01), "beta_end"), (dict(name="linear", T=0), "T"),
    (dict(name="linear", T=10.5), "T"), (dict(name="vpsde", beta_max=0.05), "beta_max"),
    (dict(name="vpsde", eps=0.0), "eps"), (dict(name="cosine", max_beta=1.0), "max_beta"),
    (dict(name="linear", bogus=1), "bogus"), (dict(name="LINEARX"), "schedule"),
])
def test_schedule_parameters_are_checked(bad, text):
    with pytest.raises(ValueError, match=text):
        get_schedule(bad)

"""DuoSampler: switch semantics, determinism, guidance, trace and input validation."""
import pytest
import torch
import torch.nn as nn

from duodiff_fast.sampling import AtTimestep, DuoSampler, get_schedule, get_solver, shallow_steps


class ToyDenoiser(nn.Module):
    """A small deterministic eps-predictor with the attributes DuoSampler reads."""

    def __init__(self, seed, img_size=8, in_channels=3, num_classes=0, time_convention="int", blocks=3,
                 out_channels=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.img_size, self.in_channels, self.num_classes = img_size, in_channels, num_classes
        self.time_convention, self.depth_blocks = time_convention, blocks
        self.null_class = num_classes if num_classes > 0 else None
        out = out_channels or in_channels
        self.mix = nn.Parameter(torch.randn(out, in_channels, generator=g) * 0.3)
        self.tw = nn.Parameter(torch.randn(out, generator=g))
        self.emb = nn.Parameter(torch.randn(max(num_classes + 1, 1), out, generator=g)) if num_classes else None
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.clone(), t.clone()))
        h = torch.einsum("oc,bchw->bohw", self.mix, x) + torch.sin(t / 100.0)[:, None, None, None] * self.tw[:, None, None]
        if y is not None:
            h = h + self.emb[y][:, :, None, None]
        return torch.tanh(h)


def manual_loop(model, solver, schedule, x, y=None, generator=None):
    """Independent plain sampling loop with one model (what deep-only sampling must equal)."""
    state = solver.init_state(x)
    for i, t in enumerate(solver.timesteps):
        tm = schedule.model_time(t.reshape(1), model.time_convention).float().expand(x.shape[0])
        eps = model(x, tm, y) if y is not None else model(x, tm)
        eps = eps[:, : model.in_channels].float()
        noise = torch.randn(x.shape, generator=generator) if solver.needs_noise(i) else None
        x = solver.step(state, i, x, eps, noise=noise)
    return x


SCHED = get_schedule("linear")


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
def test_switch_zero_is_deep_only_and_one_is_shallow_only(solver):
    shallow, deep = ToyDenoiser(1), ToyDenoiser(2, blocks=13)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref_solver = get_solver(solver, SCHED, 12)
    want_deep = manual_loop(deep, ref_solver, SCHED, noise.clone())
    want_shallow = manual_loop(shallow, get_solver(solver, SCHED, 12), SCHED, noise.clone())
    got_deep = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=12, switch=0).sample(noise=noise)
    got_shallow = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=12, switch=1).sample(noise=noise)
    assert torch.equal(got_deep, want_deep)
    assert torch.equal(got_shallow, want_shallow)
    assert not torch.allclose(got_deep, got_shallow)


def test_ddpm_deep_only_matches_manual_loop_with_same_generator():
    shallow, deep = ToyDenoiser(1), ToyDenoiser(2)
    got = DuoSampler(shallow, deep, schedule=SCHED, solver="ddpm", steps=10, switch=0).sample(
        n=2, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=g)
    want = manual_loop(deep, get_solver("ddpm", SCHED, 10), SCHED, x, generator=g)
    assert torch.equal(got, want)


def test_mixed_switch_runs_each_model_on_its_steps_and_traces_them():
    shallow, deep = ToyDenoiser(1), ToyDenoiser(2, blocks=13)
    s = DuoSampler(shallow, deep, schedule=SCHED, steps=10, switch=0.3)
    s.sample(n=2, generator=torch.Generator().manual_seed(0))
    assert s.k == 3 and len(shallow.calls) == 3 and len(deep.calls) == 7
    assert s.trace.models == ["shallow"] * 3 + ["deep"] * 7
    # shallow runs the noisiest (largest) timesteps
    assert min(s.trace.timesteps[:3]) > max(s.trace.timesteps[3:])
    assert set(s.trace.seconds) == {"shallow", "deep"} and all(v > 0 for v in s.trace.seconds.values())
    assert s.compute_fraction() == pytest.approx((3 * 3 + 13 * 7) / (13 * 10))


def test_deterministic_given_generator_and_different_across_seeds():
    shallow, deep = ToyDenoiser(1), ToyDenoiser(2)
    s = DuoSampler(shallow, deep, schedule=SCHED, solver="ddpm", steps=8, switch=0.5)
    a = s.sample(n=2, generator=torch.Generator().manual_seed(3))
    b = s.sample(n=2, generator=torch.Generator().manual_seed(3))
    c = s.sample(n=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_absolute_timestep_switch():
    solver = get_solver("ddim", SCHED, 10)
    ts = solver.timesteps
    assert shallow_steps(AtTimestep(int(ts[3])), ts) == 4
    assert shallow_steps(int(ts[3]), ts) == 4  # an int > 1 is a timestep
    assert shallow_steps(0.25, ts) == round(2.5)
    assert shallow_steps(0, ts) == 0 and shallow_steps(1, ts) == 10
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shallow_steps(1.5, ts)


def test_classifier_free_guidance():
    shallow = ToyDenoiser(1, num_classes=5)
    deep = ToyDenoiser(2, num_classes=5)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4])
    plain = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0).sample(noise=noise, y=y)
    one = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0, cfg_scale=1.0).sample(noise=noise, y=y)
    assert torch.equal(plain, one)
    deep.calls.clear()
    guided = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0, cfg_scale=4.0).sample(noise=noise, y=y)
    batch, labels, _ = deep.calls[0]
    assert batch == 4 and labels.tolist() == [1, 4, 5, 5]  # conditional half, then the null class
    assert not torch.allclose(guided, plain)
    # one guided step by hand
    s = DuoSampler(shallow, deep, schedule=SCHED, steps=1, switch=0, cfg_scale=4.0)
    t = s.solver.timesteps[0]
    tm = SCHED.model_time(t.reshape(1), "int").float().expand(2)
    c, u = deep(noise, tm, y), deep(noise, tm, torch.full_like(y, 5))
    want = s.solver.step(s.solver.init_state(noise), 0, noise, u + 4.0 * (c - u))
    assert torch.allclose(s.sample(noise=noise, y=y), want, atol=1e-6)


def test_learn_sigma_output_is_sliced_to_eps():
    shallow = ToyDenoiser(1, out_channels=6)
    deep = ToyDenoiser(2, out_channels=6)
    x = DuoSampler(shallow, deep, schedule=SCHED, steps=3, switch=0.5).sample(n=2)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("key,kw,text", [
    ("img_size", dict(img_size=16), "img_size"),
    ("in_channels", dict(in_channels=4), "in_channels"),
    ("num_classes", dict(num_classes=10), "num_classes"),
    ("time_convention", dict(time_convention="frac1000"), "time_convention"),
])
def test_mismatched_pair_is_rejected(key, kw, text):
    with pytest.raises(ValueError, match=text):
        DuoSampler(ToyDenoiser(1, **kw), ToyDenoiser(2), schedule=SCHED)


def test_bad_inputs_are_rejected_with_clear_errors():
    s = DuoSampler(ToyDenoiser(1), ToyDenoiser(2), schedule=SCHED, steps=2)
    with pytest.raises(ValueError, match="n >= 1"):
        s.sample()
    with pytest.raises(ValueError, match="n >= 1"):
        s.sample(n=0)
    with pytest.raises(ValueError, match=r"noise must be \[n, 3, 8, 8\]"):
        s.sample(noise=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="n=3 but noise has 2"):
        s.sample(n=3, noise=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        s.sample(n=2, y=torch.tensor([0, 1]))
    c = DuoSampler(ToyDenoiser(1, num_classes=5), ToyDenoiser(2, num_classes=5), schedule=SCHED, steps=2)
    with pytest.raises(ValueError, match="1-D tensor of 2 labels"):
        c.sample(n=2, y=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        c.sample(n=2, y=torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="integer class labels"):
        c.sample(n=2, y=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="class-conditional"):
        DuoSampler(ToyDenoiser(1), ToyDenoiser(2), schedule=SCHED, cfg_scale=3.0)
    with pytest.raises(ValueError, match="cuda_graphs"):
        DuoSampler(ToyDenoiser(1), ToyDenoiser(2), schedule=SCHED, cuda_graphs=True)


def test_every_preset_schedule_builds_and_maps_its_time_convention():
    from duodiff_fast.models import PRESETS
    for name, p in PRESETS.items():
        s = get_schedule(p["schedule"])
        t = torch.tensor([0.5]) if s.kind == "continuous" else torch.tensor([10])
        assert torch.isfinite(s.model_time(t, p["time_convention"])).all(), name
    # official discrete U-ViT numbers its steps 1..1000: the net sees index + 1
    huge = get_schedule(PRESETS["uvit_imagenet256_huge"]["schedule"])
    assert huge.model_time(torch.tensor([10]), "int").item() == 11.0
    assert get_schedule("linear").model_time(torch.tensor([10]), "frac1000").item() == pytest.approx(0.01)


def test_default_schedule_comes_from_the_deep_models_preset():
    from duodiff_fast.models import create_model
    kw = dict(img_size=8, patch_size=2, embed_dim=32, num_heads=2, num_classes=0)
    deep = create_model({"family": "uvit", "kwargs": dict(kw, depth=5), "time_convention": "frac1000",
                         "schedule": {"name": "linear"}})
    shallow = create_model({"family": "uvit", "kwargs": dict(kw, depth=3), "time_convention": "frac1000",
                            "schedule": {"name": "linear"}})
    s = DuoSampler(shallow, deep, steps=4, switch=0.5)
    assert s.schedule.name == "linear" and s.k == 2
    x = s.sample(n=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    assert s.compute_fraction() == pytest.approx((3 * 2 + 5 * 2) / (5 * 4))


def test_clip_sample_bounds_the_x0_prediction():
    # A denoiser whose eps is far off drives unclipped DDIM far outside the data range.
    class Wild(ToyDenoiser):
        def forward(self, x, t, y=None):
            return super().forward(x, t, y) * 3.0

    shallow, deep = Wild(1), Wild(2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    free = DuoSampler(shallow, deep, schedule=SCHED, steps=10, switch=0.5).sample(noise=noise)
    clipped = DuoSampler(shallow, deep, schedule=SCHED, steps=10, switch=0.5, clip_sample=1.0).sample(noise=noise)
    assert free.abs().max() > 2.0
    assert clipped.abs().max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="clip_sample works with 'ddim' and 'ddpm'"):
        DuoSampler(shallow, deep, schedule=SCHED, solver="dpmsolver++", clip_sample=1.0)

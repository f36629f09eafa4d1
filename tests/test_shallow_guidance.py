"""Guidance of the shallow steps (`DuoSampler(shallow_cfg_scale=...)`): the shallow segment runs at its own
scale, the deep one at `cfg_scale`, checked against an independent loop; the default is today's behaviour;
eager, static-buffer (graph) and diffusers-scheduler paths agree; bad values are refused by name."""
import pytest
import torch

from duodiff_fast._validate import ArgumentError
from duodiff_fast.cli import parse_shallow_cfg
from duodiff_fast.sampling import DuoSampler
from duodiff_fast.sampling.graphs import GraphCache, GraphRunner

from .test_duo import SCHED, ToyDenoiser

CLASSES = 5


def _pair():
    return ToyDenoiser(1, num_classes=CLASSES), ToyDenoiser(2, num_classes=CLASSES, blocks=13)


def _reference(shallow, deep, solver, k, x, y, ws, wd):
    """Plain loop: steps [0, k) on `shallow` guided with ws, [k, N) on `deep` with wd (None/1 = conditional)."""
    state = solver.init_state(x)
    for i, t in enumerate(solver.timesteps):
        m, w = (shallow, ws) if i < k else (deep, wd)
        tm = SCHED.model_time(t.reshape(1), "int").float().expand(x.shape[0])
        c = m(x, tm, y)
        if w is None or w == 1.0:
            eps = c
        else:
            u = m(x, tm, torch.full_like(y, m.null_class))
            eps = u + w * (c - u)
        x = solver.step(state, i, x, eps, noise=None)
    return x


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("wd,ws", [(3.0, 1.0), (3.0, 2.0), (3.0, 0.0), (None, 2.5), (1.0, 4.0), (2.0, 5.0)])
def test_each_segment_runs_at_its_own_scale(solver, wd, ws):
    shallow, deep = _pair()
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 4])
    s = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=6, switch=0.5, cfg_scale=wd,
                   shallow_cfg_scale=ws)
    assert (s.scale_of("shallow"), s.scale_of("deep")) == (ws, wd)
    got = s.sample(noise=noise, y=y)
    ref_solver = type(s.solver)(SCHED, 6) if solver == "dpmsolver++" else s.solver
    want = _reference(shallow, deep, ref_solver, s.k, noise, y, ws, wd)
    assert s.k == 3 and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_default_is_the_deep_scale_and_unchanged_behaviour():
    shallow, deep = _pair()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3])
    kw = dict(schedule=SCHED, steps=6, switch=0.5, cfg_scale=3.0)
    default = DuoSampler(shallow, deep, **kw)
    assert default.shallow_cfg_scale == 3.0 and "shallow_cfg_scale" not in repr(default)
    same = DuoSampler(shallow, deep, shallow_cfg_scale=3.0, **kw)
    assert torch.equal(default.sample(noise=noise, y=y), same.sample(noise=noise, y=y))
    other = DuoSampler(shallow, deep, shallow_cfg_scale=1.5, **kw)
    assert "shallow_cfg_scale=1.5" in repr(other)
    assert not torch.allclose(other.sample(noise=noise, y=y), same.sample(noise=noise, y=y))
    # off entirely: no scale anywhere, labels never doubled
    plain = DuoSampler(shallow, deep, schedule=SCHED, steps=6, switch=0.5)
    assert plain.shallow_cfg_scale is None and not plain.guided


def test_an_unguided_shallow_segment_runs_one_forward_on_the_real_labels():
    shallow, deep = _pair()
    y = torch.tensor([1, 3])
    s = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0.5, cfg_scale=3.0, shallow_cfg_scale=1.0)
    shallow.calls.clear()
    deep.calls.clear()
    s.sample(n=2, y=y, generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in shallow.calls] == [2, 2] and all(c[1].tolist() == [1, 3] for c in shallow.calls)
    assert [c[0] for c in deep.calls] == [4, 4] and all(c[1].tolist() == [1, 3, 5, 5] for c in deep.calls)
    # the other way round: shallow guided, deep not
    s = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0.5, cfg_scale=None, shallow_cfg_scale=2.0)
    shallow.calls.clear()
    deep.calls.clear()
    s.sample(n=2, y=y, generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in shallow.calls] == [4, 4] and [c[0] for c in deep.calls] == [2, 2]
    assert all(c[1].tolist() == [1, 3] for c in deep.calls)


def test_same_model_in_both_segments_takes_the_segment_scale():
    """DuoSampler(deep, deep): the segment, not the model object, decides the scale."""
    _, deep = _pair()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1])
    s = DuoSampler(deep, deep, schedule=SCHED, steps=6, switch=0.5, cfg_scale=3.0, shallow_cfg_scale=1.0)
    want = _reference(deep, deep, s.solver, s.k, noise, y, 1.0, 3.0)
    assert torch.allclose(s.sample(noise=noise, y=y), want, atol=1e-5)
    x, t = noise, torch.tensor(500.0)
    yy = torch.tensor([0, 1])
    assert torch.allclose(s.eps(deep, x, t, yy, segment="shallow"), deep(x, t.expand(2), yy))
    assert not torch.allclose(s.eps(deep, x, t, yy), s.eps(deep, x, t, yy, segment="shallow"))
    with pytest.raises(ArgumentError, match="segment must be 'shallow' or 'deep'"):
        s.scale_of("middle")


@pytest.mark.parametrize("mode", ["segment", "step"])
@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmsolver++"])
def test_static_graph_runner_equals_eager(solver, mode):
    shallow, deep = _pair()
    s = DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=6, switch=0.5, cfg_scale=3.0,
                   shallow_cfg_scale=1.0)
    from duodiff_fast.sampling.duo import SampleTrace
    from duodiff_fast.sampling.segments import draw_step_noise
    want = s.sample(n=3, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        x, y = s._inputs(3, None, None, g)
        noise = draw_step_noise(s.solver, tuple(x.shape), g, s.device)
        runner = GraphRunner(s, capture=False, mode=mode, cache=GraphCache())
        got = runner.run(x, y, noise, SampleTrace(seconds={"shallow": 0.0, "deep": 0.0}))
    assert (got - want).abs().max().item() <= 1e-6


def test_graph_key_separates_the_shallow_scale():
    shallow, deep = _pair()
    kw = dict(schedule=SCHED, steps=6, switch=0.5, cfg_scale=3.0)
    keys = {GraphRunner(DuoSampler(shallow, deep, shallow_cfg_scale=w, **kw), capture=False).key(4)
            for w in (None, 3.0, 2.0, 1.0)}
    assert len(keys) == 3  # None and 3.0 are the same setting


def test_bad_shallow_scales_are_refused_by_name():
    shallow, deep = _pair()
    for bad in (-1.0, float("nan"), float("inf"), "high", [2.0]):
        with pytest.raises(ArgumentError, match="shallow_cfg_scale"):
            DuoSampler(shallow, deep, schedule=SCHED, cfg_scale=3.0, shallow_cfg_scale=bad)
    with pytest.raises(ArgumentError, match="shallow_cfg_scale"):
        DuoSampler(shallow, deep, schedule=SCHED, cfg_scale=3.0, shallow_cfg_scale="preset")
    a, b = ToyDenoiser(1), ToyDenoiser(2)  # unconditional
    with pytest.raises(ArgumentError, match=r"shallow_cfg_scale=2 needs a class-conditional model"):
        DuoSampler(a, b, schedule=SCHED, shallow_cfg_scale=2.0)
    DuoSampler(a, b, schedule=SCHED, shallow_cfg_scale=1.0)  # 1 is no guidance: fine without classes
    a, b = _pair()
    a.null_class = b.null_class = None
    with pytest.raises(ArgumentError, match=r"shallow_cfg_scale=2 but the shallow model has no null_class"):
        DuoSampler(a, b, schedule=SCHED, shallow_cfg_scale=2.0)


def test_early_exit_sampler_refuses_a_shallow_scale():
    from duodiff_fast.models import create_model
    from duodiff_fast.models.exits import EarlyExitModel
    from duodiff_fast.sampling import EarlyExitSampler
    spec = {"family": "uvit", "kwargs": dict(img_size=8, patch_size=4, in_chans=3, embed_dim=32, depth=3,
                                             num_heads=2, num_classes=4)}
    model = EarlyExitModel(create_model(spec), "duodiff")
    with pytest.raises(ArgumentError, match="shallow_cfg_scale does not apply"):
        EarlyExitSampler(model, 0.5, schedule=SCHED, cfg_scale=3.0, shallow_cfg_scale=1.0)


def test_diffusers_model_fn_takes_the_shallow_scale():
    from duodiff_fast.sampling.diffusers_loop import make_model_fn
    shallow, deep = _pair()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([2, 4])
    fn = make_model_fn(shallow, deep, schedule=SCHED, y=y, cfg_scale=3.0, shallow_cfg_scale=1.0)
    tm = SCHED.model_time(torch.tensor([400]), "int").float().expand(2)
    assert torch.allclose(fn("shallow", x, 400), shallow(x, tm, y))
    c, u = deep(x, tm, y), deep(x, tm, torch.full_like(y, CLASSES))
    assert torch.allclose(fn("deep", x, 400), u + 3.0 * (c - u), atol=1e-6)
    same = make_model_fn(shallow, deep, schedule=SCHED, y=y, cfg_scale=3.0)
    c, u = shallow(x, tm, y), shallow(x, tm, torch.full_like(y, CLASSES))
    assert torch.allclose(same("shallow", x, 400), u + 3.0 * (c - u), atol=1e-6)
    with pytest.raises(ArgumentError, match="shallow_cfg_scale"):
        make_model_fn(shallow, deep, schedule=SCHED, y=y, cfg_scale=3.0, shallow_cfg_scale=-2.0)
    with pytest.raises(ValueError, match="shallow_cfg_scale=2 needs class labels"):
        make_model_fn(shallow, deep, schedule=SCHED, y=None, shallow_cfg_scale=2.0)


def test_cli_parses_the_shallow_scale():
    import argparse
    assert parse_shallow_cfg("same") is None and parse_shallow_cfg("SAME") is None
    assert parse_shallow_cfg("off") == 1.0 and parse_shallow_cfg("2") == 2.0 and parse_shallow_cfg("0") == 0.0
    for bad in ("-1", "nan", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shallow_cfg(bad)


def test_pipeline_passes_the_shallow_scale_to_the_sampler():
    from duodiff_fast.models import create_model
    from duodiff_fast.pipeline import DuoDiffPipeline
    spec = {"family": "uvit", "kwargs": dict(img_size=8, patch_size=4, in_chans=3, embed_dim=32, depth=3,
                                             num_heads=2, num_classes=4), "schedule": {"name": "linear"}}
    torch.manual_seed(0)
    deep = create_model(spec).eval()
    shallow = create_model(dict(spec, kwargs=dict(spec["kwargs"], depth=1))).eval()
    pipe = DuoDiffPipeline(shallow, deep, "ddim", switch=0.5)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    got = pipe([1, 2], generator=torch.Generator().manual_seed(0), shallow_guidance_scale=1.0, **kw).images
    s = DuoSampler(shallow, deep, schedule=deep.schedule_spec, steps=4, switch=0.5, cfg_scale=3.0,
                   shallow_cfg_scale=1.0)
    want = s.sample(n=2, y=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    same = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(same, got)


def test_compute_fraction_counts_the_forwards_of_each_segment():
    shallow, deep = _pair()  # 3 and 13 blocks
    kw = dict(schedule=SCHED, steps=10, switch=0.4)
    same = DuoSampler(shallow, deep, cfg_scale=3.0, **kw)
    assert same.compute_fraction() == pytest.approx((3 * 4 + 13 * 6) / (13 * 10))  # the plain block count
    off = DuoSampler(shallow, deep, cfg_scale=3.0, shallow_cfg_scale=1.0, **kw)
    assert off.compute_fraction() == pytest.approx((3 * 4 + 2 * 13 * 6) / (2 * 13 * 10))
    up = DuoSampler(shallow, deep, cfg_scale=None, shallow_cfg_scale=2.0, **kw)
    assert up.compute_fraction() == pytest.approx((2 * 3 * 4 + 13 * 6) / (13 * 10))


def test_sweep_tool_runs_end_to_end(tmp_path):
    """tools/shallow_cfg_sweep.py on a tiny run of the shipped pair: one row per mode, scales recorded, the
    control rows run the deep model first, speed-ups count the forwards."""
    import importlib.util
    import json
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(root, "tools", "shallow_cfg_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--n", "6", "--steps", "4", "--scales", "3,1", "--switches", "0.5", "--control",
                     "--reference-n", "32", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["mode"]: r for r in saved["rows"]}
    assert list(rows) == ["deep-only", "DuoDiff 0.5, shallow 3", "DuoDiff 0.5, shallow 1",
                          "deep model, 1 for the first 0.5", "shallow-only 3", "shallow-only 1"]
    assert rows["DuoDiff 0.5, shallow 1"]["shallow_cfg_scale"] == 1.0
    assert rows["deep model, 1 for the first 0.5"]["first_model"] == "deep"
    assert rows["DuoDiff 0.5, shallow 3"]["theoretical_speedup"] == pytest.approx(13 * 4 / (3 * 2 + 13 * 2))
    assert rows["DuoDiff 0.5, shallow 1"]["theoretical_speedup"] == pytest.approx(13 * 2 * 4 / (3 * 2 + 13 * 2 * 2))
    assert "class_acc_diff_vs_deep" in rows["shallow-only 1"]
    assert (tmp_path / "results.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["segment", "step"])
def test_gpu_graphs_replay_a_segment_specific_scale(mode):
    """Captured graphs hold each segment's own scale: replay equals eager, and the graphs of one scale are
    not reused for another."""
    from .test_graphs import _gpu_pair
    shallow, deep = _gpu_pair()
    y = torch.tensor([1, 2, 3, 4], device="cuda")
    kw = dict(schedule=SCHED, solver="ddim", steps=8, switch=0.5, cfg_scale=2.0, graph_mode=mode)
    outs = {}
    for ws in (1.0, 3.0):
        eager = DuoSampler(shallow, deep, cuda_graphs=False, shallow_cfg_scale=ws, **kw)
        graphed = DuoSampler(shallow, deep, cuda_graphs=True, shallow_cfg_scale=ws, **kw)
        want = eager.sample(n=4, y=y, generator=torch.Generator("cuda").manual_seed(0))
        got = graphed.sample(n=4, y=y, generator=torch.Generator("cuda").manual_seed(0))
        assert graphed.trace.graphs
        assert (got.float() - want.float()).abs().max().item() <= 5e-2
        outs[ws] = got  # graphs kept: a key without the shallow scale would replay 1.0's graphs for 3.0
    graphed.release_graphs()
    assert (outs[1.0].float() - outs[3.0].float()).abs().max().item() > 1e-3

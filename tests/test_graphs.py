"""CUDA-graph segments. On CPU the static-buffer runner (the capture code path minus the capture call) is
checked against the plain sampler for every solver, switch, guidance setting and granularity, with batch
buckets, padding, chunking and re-keying. The capture itself, replay == eager and the no-sync property
under torch.cuda.set_sync_debug_mode("error") are GPU tests (skipped here)."""
import logging

import pytest
import torch

from duodiff_fast.sampling import DuoSampler
from duodiff_fast.sampling.graphs import CACHE, GraphCache, GraphRunner, bucket_size

from .test_duo import SCHED, ToyDenoiser

SOLVERS = [("ddim", {}), ("ddim", {"eta": 0.7}), ("ddpm", {}), ("dpmsolver++", {}), ("dpm++3m", {})]


def sampler(solver, kw, switch, cfg, **extra):
    classes = 5 if cfg else 0
    shallow, deep = ToyDenoiser(1, num_classes=classes), ToyDenoiser(2, num_classes=classes, blocks=13)
    return DuoSampler(shallow, deep, schedule=SCHED, solver=solver, steps=6, switch=switch,
                      cfg_scale=cfg, **kw, **extra)


def run_static(s, n, seed, mode="segment", max_bucket=128, y=None):
    """What sample() does with graphs, with the capture call switched off."""
    from duodiff_fast.sampling.duo import SampleTrace
    from duodiff_fast.sampling.segments import draw_step_noise
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x, y = s._inputs(n, None, y, g)
        noise = draw_step_noise(s.solver, tuple(x.shape), g, s.device)
        runner = GraphRunner(s, capture=False, mode=mode, max_bucket=max_bucket, cache=GraphCache())
        return runner.run(x, y, noise, SampleTrace(seconds={"shallow": 0.0, "deep": 0.0})), runner


@pytest.mark.parametrize("mode", ["segment", "step"])
@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("switch", [0, 0.5, 1])
@pytest.mark.parametrize("solver,kw", SOLVERS, ids=lambda v: str(v))
def test_static_runner_equals_plain_sampler(solver, kw, switch, cfg, mode):
    s = sampler(solver, kw, switch, cfg)
    want = s.sample(n=3, generator=torch.Generator().manual_seed(4))  # eager on CPU
    got, _ = run_static(s, 3, 4, mode)  # padded to a bucket of 4
    err = (got - want).abs().max().item()
    print(f"{solver} {kw} switch={switch} cfg={cfg} {mode}: max |static - eager| = {err:.2e}")
    assert got.shape == want.shape and err <= 1e-6


def test_buckets_chunks_and_rekeying():
    s = sampler("dpmsolver++", {}, 0.5, 3.0)
    cache = GraphCache(max_entries=3)
    from duodiff_fast.sampling.duo import SampleTrace
    from duodiff_fast.sampling.segments import draw_step_noise

    def go(n, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            x, y = s._inputs(n, None, None, g)
            noise = draw_step_noise(s.solver, tuple(x.shape), g, s.device)
            r = GraphRunner(s, capture=False, max_bucket=4, cache=cache)
            return r.run(x, y, noise, SampleTrace(seconds={"shallow": 0.0, "deep": 0.0}))

    for n in (1, 2, 3, 4, 3, 2, 1):
        want = s.sample(n=n, generator=torch.Generator().manual_seed(n))
        assert (go(n, n) - want).abs().max() <= 1e-6
    assert cache.captures == 3 and sorted(k[2] for k in cache.keys()) == [1, 2, 4]  # one entry per bucket
    want = s.sample(n=9, generator=torch.Generator().manual_seed(9))  # > max_bucket: chunks of 4, 4, 1
    assert (go(9, 9) - want).abs().max() <= 1e-6
    assert cache.captures == 3  # the chunks reused the bucket-4 and bucket-1 entries
    cache.release()
    assert len(cache) == 0


def test_cache_is_lru_with_a_size_limit_and_logs_new_keys(caplog):
    cache = GraphCache(max_entries=2)
    s = sampler("ddim", {}, 0.5, None)
    with caplog.at_level(logging.DEBUG, logger="duodiff_fast.graphs"):
        for n in (1, 2, 4, 1):
            run_static_cache(s, n, cache)
    assert cache.captures == 4 and len(cache) == 2  # bucket 1 was evicted, then captured again
    assert sum("new key" in r.message for r in caplog.records) == 4


def run_static_cache(s, n, cache):
    from duodiff_fast.sampling.duo import SampleTrace
    from duodiff_fast.sampling.segments import draw_step_noise
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x, y = s._inputs(n, None, None, g)
        noise = draw_step_noise(s.solver, tuple(x.shape), g, s.device)
        GraphRunner(s, capture=False, cache=cache).run(x, y, noise, SampleTrace(seconds={"shallow": 0.0,
                                                                                         "deep": 0.0}))


def test_key_separates_what_changes_the_graph():
    a = GraphRunner(sampler("ddim", {}, 0.5, None), capture=False)
    b = GraphRunner(sampler("ddim", {}, 0.2, None), capture=False)
    c = GraphRunner(sampler("ddim", {"eta": 0.3}, 0.5, None), capture=False)
    d = GraphRunner(sampler("ddim", {}, 0.5, None), capture=False, mode="step")
    keys = {r.key(4)[2:] for r in (a, b, c, d)}
    assert len(keys) == 4
    assert a.key(4) != a.key(8)


def test_bucket_sizes():
    assert [bucket_size(n, 128) for n in (1, 2, 3, 5, 8, 9, 100, 128, 500)] == [1, 2, 4, 8, 8, 16, 128, 128, 128]
    assert bucket_size(3, 2) == 2


def test_cuda_graphs_flag():
    s = sampler("ddim", {}, 0.5, None)
    assert not s.uses_graphs()  # 'auto' on CPU: eager
    with pytest.raises(ValueError, match="cuda_graphs=True needs CUDA"):
        sampler("ddim", {}, 0.5, None, cuda_graphs=True)
    with pytest.raises(ValueError, match="capture=True needs CUDA"):
        GraphRunner(s, capture=True)
    with pytest.raises(ValueError, match="graph_mode"):
        sampler("ddim", {}, 0.5, None, graph_mode="whole")


# ----------------------------------------------------------------------------------------------------
# GPU: capture, replay == eager, no host sync inside, buckets
# ----------------------------------------------------------------------------------------------------

def _gpu_pair(dtype=torch.bfloat16):
    from duodiff_fast.models import create_model
    torch.manual_seed(0)
    spec = {"family": "uvit", "kwargs": dict(img_size=16, patch_size=2, embed_dim=128, depth=6, num_heads=2,
                                             num_classes=11), "time_convention": "frac1000",
            "schedule": {"name": "linear"}}
    deep = create_model(spec).cuda().to(dtype).eval()
    shallow = create_model(dict(spec, kwargs=dict(spec["kwargs"], depth=3))).cuda().to(dtype).eval()
    return shallow, deep


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["segment", "step"])
@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmsolver++"])
def test_gpu_replay_equals_eager_and_never_syncs(solver, mode):
    shallow, deep = _gpu_pair()
    kw = dict(schedule=SCHED, solver=solver, steps=8, switch=0.5, cfg_scale=2.0, graph_mode=mode)
    eager = DuoSampler(shallow, deep, cuda_graphs=False, **kw)
    graphed = DuoSampler(shallow, deep, cuda_graphs=True, **kw)
    y = torch.tensor([1, 2, 3], device="cuda")
    want = eager.sample(n=3, y=y, generator=torch.Generator("cuda").manual_seed(0))
    # The first call captures (bucket 4) with torch.cuda.set_sync_debug_mode("error") around every captured
    # region (graphs.py): a host sync inside would raise here. The second call replays.
    graphed.sample(n=3, y=y, generator=torch.Generator("cuda").manual_seed(0))
    got = graphed.sample(n=3, y=y, generator=torch.Generator("cuda").manual_seed(0))
    assert graphed.trace.graphs
    err = (got.float() - want.float()).abs().max().item()
    print(f"{solver}/{mode}: max |replay - eager| = {err:.3e}")
    # padding 3 -> 4 changes matmul batch shapes, so allow bf16 rounding; identical at a full bucket
    assert err <= 5e-2
    full = eager.sample(n=4, y=torch.tensor([1, 2, 3, 4], device="cuda"),
                        generator=torch.Generator("cuda").manual_seed(1))
    gfull = graphed.sample(n=4, y=torch.tensor([1, 2, 3, 4], device="cuda"),
                           generator=torch.Generator("cuda").manual_seed(1))
    assert (gfull.float() - full.float()).abs().max().item() <= 5e-2
    graphed.release_graphs()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_capture_happens_once_per_bucket():
    shallow, deep = _gpu_pair()
    s = DuoSampler(shallow, deep, schedule=SCHED, steps=4, switch=0.5, cuda_graphs=True)
    before = CACHE.captures
    for n in (3, 4, 2, 3, 4):
        s.sample(n=n, generator=torch.Generator("cuda").manual_seed(n))
    assert CACHE.captures - before == 2  # buckets 4 and 2
    s.release_graphs()

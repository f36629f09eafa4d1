"""Schedules and solvers against diffusers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler).

diffusers builds its beta tables in float32, ours are float64. The solver comparisons therefore run
diffusers on float64 tables built by its own formulas (``_diffusers(..., float64_tables=True)``), which
isolates the solver math; separate tests compare the tables themselves and run stock diffusers.
"""
import math

import pytest
import torch

from duodiff_fast.sampling.schedules import get_schedule, linear, vpsde
from duodiff_fast.sampling.solvers import get_solver

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

# diffusers' DPM scheduler calls np.array on a tensor, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 3, 8, 8)
SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
_DIFFUSERS_CFG = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
_DIFFUSERS_CLS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
                  "dpm++3m": DPMSolverMultistepScheduler}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: intra-op threads only spin, and on a busy 2-core machine that costs 50x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel_err(out, ref, label=""):
    err = (out - ref).abs()
    rel = (err.max() / ref.abs().max()).item()
    print(f"{label}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}, rel {rel:.3e}")
    return rel


def _toy_net(seed=0):
    """Deterministic smooth eps-model eps = tanh(a * x + b * t / 1000) with fixed random a, b."""
    g = torch.Generator().manual_seed(seed)
    a = 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    b = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return lambda x, t: torch.tanh(a * x + b * (float(t) / 1000))


def _diffusers(solver, sched_name, spacing, steps, float64_tables, **cfg):
    cls = _DIFFUSERS_CLS[solver]
    kw = dict(_DIFFUSERS_CFG[sched_name], timestep_spacing=spacing, **cfg)
    if solver == "dpm++3m":
        kw["solver_order"] = 3
    d = cls(**kw)
    d.set_timesteps(steps)
    if float64_tables:
        ac = get_schedule(sched_name).alphas_cumprod.clone()  # == diffusers' formula evaluated in float64
        d.alphas_cumprod = ac
        if solver == "ddim":
            one = torch.tensor(1.0, dtype=torch.float64)
            d.final_alpha_cumprod = one if d.config.set_alpha_to_one else ac[0]
        elif solver == "ddpm":
            d.one = torch.tensor(1.0, dtype=torch.float64)
        else:
            # What set_timesteps computes (sigma table looked up at integer timesteps, final 0), in float64.
            sig = ((1 - ac) / ac).sqrt()
            d.sigmas = torch.cat([sig[d.timesteps], torch.zeros(1, dtype=torch.float64)])
    return d


def _run_both(solver, sched_name, spacing, steps, float64_tables=True, ours_kw=None, theirs_kw=None, eta=0.0,
              seed=0):
    """Run our solver and diffusers from the same x_T, same toy net and same per-step noise."""
    ours_kw, theirs_kw = dict(ours_kw or {}), dict(theirs_kw or {})
    if solver == "ddim":
        ours_kw["eta"] = eta
    s = get_solver(solver, sched_name, steps, spacing, **ours_kw)
    d = _diffusers(solver, sched_name, spacing, steps, float64_tables, **theirs_kw)
    assert torch.equal(s.timesteps, d.timesteps), (s.timesteps, d.timesteps)
    net = _toy_net(seed)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    # DDPMScheduler draws its own noise from a generator when t > 0; a twin generator feeds ours.
    g_theirs = torch.Generator().manual_seed(seed + 2)
    g_ours = torch.Generator().manual_seed(seed + 2)
    g_ddim = torch.Generator().manual_seed(seed + 3)
    xa, xb = x_T.clone(), x_T.clone()
    state = s.init_state(xa)
    for i, t in enumerate(s.timesteps):
        if solver == "ddpm":
            assert s.needs_noise(i) == bool(t > 0)
            noise = torch.randn(SHAPE, generator=g_ours, dtype=torch.float64) if s.needs_noise(i) else None
            xb = d.step(net(xb, t), t, xb, generator=g_theirs).prev_sample
        elif solver == "ddim":
            noise = torch.randn(SHAPE, generator=g_ddim, dtype=torch.float64)
            xb = d.step(net(xb, t), t, xb, eta=eta, variance_noise=noise).prev_sample
            noise = noise if s.needs_noise(i) else None
        else:
            noise = None
            xb = d.step(net(xb, t), t, xb).prev_sample
        xa = s.step(state, i, xa, net(xa, t), noise)
    assert xa.dtype == torch.float64 and torch.isfinite(xa).all()
    return xa, xb


# ---------------------------------------------------------------------------------------------------------
# Tables and timesteps
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_tables_match_diffusers(name):
    ours = get_schedule(name)
    ref = DDPMScheduler(**_DIFFUSERS_CFG[name])
    assert ours.kind == "discrete" and ours.T == 1000 and ours.alphas_cumprod.dtype == torch.float64
    rel_b = ((ours.betas - ref.betas.double()).abs() / ref.betas.double()).max().item()
    rel_ac = ((ours.alphas_cumprod - ref.alphas_cumprod.double()).abs() / ours.alphas_cumprod).max().item()
    print(f"{name}: betas rel err {rel_b:.3e}, alphas_cumprod rel err {rel_ac:.3e} (diffusers is float32)")
    assert rel_b < 1e-6
    # float32 cumprod drifts; for cosine alphabar reaches 2e-9 at t=999 and the drift peaks there.
    assert rel_ac < (3e-5 if name == "cosine" else 2e-6)
    a, s = ours.alpha_sigma(torch.arange(1000))
    torch.testing.assert_close(a * a, ours.alphas_cumprod, rtol=1e-14, atol=0)
    torch.testing.assert_close(a * a + s * s, torch.ones(1000, dtype=torch.float64), rtol=1e-14, atol=0)


STEP_COUNTS = (1, 2, 3, 7, 10, 25, 50, 61, 100, 103, 250, 999, 1000)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_diffusers(spacing):
    sched = linear()
    for steps in STEP_COUNTS:
        for solver, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler),
                            ("dpmsolver++", DPMSolverMultistepScheduler)):
            if solver == "dpmsolver++" and spacing != "trailing" and steps == 1000:
                # diffusers' steps+1-point grids repeat timesteps here (1000 zeros for 'leading').
                with pytest.raises(ValueError, match="repeated"):
                    get_solver(solver, sched, steps, spacing)
                continue
            ours = get_solver(solver, sched, steps, spacing).timesteps
            d = cls(timestep_spacing=spacing)
            d.set_timesteps(steps)
            theirs = d.timesteps
            assert ours.dtype == torch.int64 and len(ours) == steps
            # For some counts (61, 103, ...) diffusers' float arange in 'trailing' adds a bogus t=-1.
            assert torch.equal(ours, theirs[:steps]), (solver, steps, ours[:6], theirs[:6])
            assert (theirs[steps:] == -1).all()
            if solver != "dpmsolver++":
                assert torch.equal(ours, sched.timesteps(steps, spacing))


# ---------------------------------------------------------------------------------------------------------
# Trajectories against diffusers
# ---------------------------------------------------------------------------------------------------------

CASES = [  # (solver, steps, eta, our kwargs, diffusers kwargs)
    ("ddpm", 10, 0.0, {}, dict(clip_sample=False)),
    ("ddpm", 50, 0.0, {}, dict(clip_sample=False)),
    ("ddim", 10, 0.0, {}, dict(clip_sample=False)),
    ("ddim", 50, 0.0, {}, dict(clip_sample=False)),
    ("ddim", 50, 1.0, {}, dict(clip_sample=False)),
    ("ddim", 10, 0.5, dict(set_alpha_to_one=False), dict(clip_sample=False, set_alpha_to_one=False)),
    ("dpmsolver++", 10, 0.0, {}, {}),
    ("dpmsolver++", 50, 0.0, {}, {}),
    ("dpm++3m", 10, 0.0, {}, {}),
    ("dpm++3m", 20, 0.0, {}, {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-eta{c[2]}{'-final' if c[3] else ''}")
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_solver_matches_diffusers(sched_name, spacing, case):
    solver, steps, eta, ours_kw, theirs_kw = case
    xa, xb = _run_both(solver, sched_name, spacing, steps, ours_kw=ours_kw, theirs_kw=theirs_kw, eta=eta)
    # DPMSolverMultistepScheduler rounds the sample to float32 every step (~3e-7 here); DDPM/DDIM ~1e-13.
    assert _rel_err(xa, xb, f"{solver} {sched_name} {spacing} {steps} steps") <= 1e-5


@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_ddpm_1000_steps_matches_diffusers(sched_name):
    xa, xb = _run_both("ddpm", sched_name, "leading", 1000, theirs_kw=dict(clip_sample=False))
    assert _rel_err(xa, xb, f"ddpm {sched_name} 1000 steps") <= 1e-5


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_clip_sample_matches_diffusers(solver):
    xa, xb = _run_both(solver, "linear", "leading", 20, ours_kw=dict(clip_sample=1.0),
                       theirs_kw=dict(clip_sample=True), eta=0.3)
    assert _rel_err(xa, xb, f"{solver} clip_sample") <= 1e-5


@pytest.mark.parametrize("solver,steps", [("ddim", 10), ("ddim", 50),
                                          ("dpmsolver++", 10), ("dpmsolver++", 50)])
@pytest.mark.parametrize("sched_name", SCHEDULES)
def test_matches_stock_diffusers_float32_tables(sched_name, solver, steps):
    """Stock diffusers (float32 tables) over the three spacings: the table drift stays below 1e-5."""
    for spacing in SPACINGS:
        xa, xb = _run_both(solver, sched_name, spacing, steps, float64_tables=False,
                           theirs_kw=dict(clip_sample=False) if solver == "ddim" else {})
        assert _rel_err(xa, xb, f"stock {solver} {sched_name} {spacing} {steps}") <= 1e-5


def test_ddpm_1000_steps_stock_diffusers_is_table_limited():
    # 1000 ancestral steps amplify the float32 alphabar drift of stock diffusers to ~1e-5..3e-4; with
    # float64 tables (test above) the same run agrees to ~1e-13.
    xa, xb = _run_both("ddpm", "cosine", "leading", 1000, float64_tables=False,
                       theirs_kw=dict(clip_sample=False))
    assert _rel_err(xa, xb, "stock ddpm cosine 1000") <= 1e-3


# ---------------------------------------------------------------------------------------------------------
# Perfect denoisers and the continuous VP-SDE
# ---------------------------------------------------------------------------------------------------------

def test_vpsde_alpha_sigma_closed_form():
    sch = vpsde(beta_min=0.1, beta_max=20.0)
    assert sch.kind == "continuous" and sch.T == 1.0
    t = torch.cat([torch.tensor([1e-6, 1e-3]), torch.rand(64, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([1.0])]).double()
    a, s = sch.alpha_sigma(t)
    log_ab = [-(ti ** 2) * (20.0 - 0.1) / 2 - ti * 0.1 for ti in t.tolist()]
    a_ref = torch.tensor([math.exp(v / 2) for v in log_ab], dtype=torch.float64)
    s_ref = torch.tensor([math.sqrt(-math.expm1(v)) for v in log_ab], dtype=torch.float64)
    assert a.dtype == s.dtype == torch.float64
    assert _rel_err(a, a_ref, "vpsde alpha") < 1e-14
    assert ((s - s_ref).abs() / s_ref).max() < 1e-12  # relative even at t=1e-6, where sigma ~ 3e-4
    torch.testing.assert_close(a * a + s * s, torch.ones_like(a), rtol=1e-14, atol=0)
    # Round trip through the log-SNR inverse.
    torch.testing.assert_close(sch.t_from_log_snr(sch.log_snr(t)), t, rtol=1e-9, atol=1e-12)


def test_vpsde_timesteps():
    sch = vpsde()
    ts = sch.timesteps(11)
    torch.testing.assert_close(ts, torch.linspace(1.0, 1e-3, 11, dtype=torch.float64), rtol=0, atol=0)
    ts = sch.timesteps(11, "logSNR")
    lam = sch.log_snr(ts)
    assert ts[0] == 1.0 and ts[-1] == 1e-3 and (ts.diff() < 0).all()
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=1e-9, atol=0)
    assert get_solver("ddim", sch, 7).timesteps.dtype == torch.float64


_PERFECT_CASES = [(sched, spacing, solver)
                  for sched, spacing in [("linear", "leading"), ("cosine", "trailing"),
                                         ("vpsde", "uniform"), ("vpsde", "logSNR")]
                  for solver in ("ddpm", "ddim", "dpmsolver++", "dpm++3m")
                  if not (solver == "ddpm" and sched == "vpsde")]  # DDPM is discrete only (test_errors)


@pytest.mark.parametrize("sched_name,spacing,solver", _PERFECT_CASES)
def test_perfect_denoiser_recovers_data_point(sched_name, spacing, solver):
    """Data = one fixed point x*, eps computed exactly from (x, t): every solver must end on x*."""
    sch = get_schedule(sched_name)
    g = torch.Generator().manual_seed(5)
    x_star = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    s = get_solver(solver, sch, 12, spacing, **({"eta": 0.7} if solver == "ddim" else {}))
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    state = s.init_state(x)
    for i, t in enumerate(s.timesteps):
        a, sg = sch.alpha_sigma(t)
        eps = (x - a * x_star) / sg
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64) if s.needs_noise(i) else None
        x = s.step(state, i, x, eps, noise)
    assert _rel_err(x, x_star, f"{solver} {sched_name} {spacing} perfect denoiser") < 1e-9


def test_vpsde_gaussian_data_convergence():
    """Gaussian data N(mu, s^2): exact eps is known and so is the probability-flow ODE solution.
    The target is the ODE solution at t=eps denoised exactly (what the last step computes).
    DDIM must converge at first order, DPM-Solver++ 2M at second order on a log-SNR grid."""
    sch = vpsde()
    g = torch.Generator().manual_seed(7)
    mu = torch.randn(4, 64, generator=g, dtype=torch.float64)
    z = torch.randn(4, 64, generator=g, dtype=torch.float64)
    s = 0.5

    def eps_fn(x, t):
        a, sg = sch.alpha_sigma(t)
        return sg * (x - a * mu) / (a * a * s * s + sg * sg)

    a1, s1 = sch.alpha_sigma(torch.tensor(1.0))
    x1 = a1 * mu + torch.sqrt(a1 * a1 * s * s + s1 * s1) * z
    ae, se = sch.alpha_sigma(torch.tensor(sch.eps))
    target = mu + z * ae * s * s / torch.sqrt(ae * ae * s * s + se * se)

    def err(name, steps):
        sol = get_solver(name, sch, steps, "logSNR")
        x = x1.clone()
        state = sol.init_state(x)
        for i, t in enumerate(sol.timesteps):
            x = sol.step(state, i, x, eps_fn(x, t))
        return _rel_err(x, target, f"{name} {steps} steps (Gaussian data)")

    e_ddim = [err("ddim", n) for n in (25, 50, 100)]
    e_dpm = [err("dpmsolver++", n) for n in (25, 50, 100)]
    assert 1.7 < e_ddim[0] / e_ddim[1] < 2.3 and 1.7 < e_ddim[1] / e_ddim[2] < 2.3
    assert e_dpm[0] / e_dpm[1] > 3.0 and e_dpm[1] / e_dpm[2] > 3.0
    assert e_dpm[2] < 5e-4 < e_ddim[2]


# ---------------------------------------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------------------------------------

def test_model_time_conventions():
    t = torch.tensor([999, 500, 0])
    lin = linear()
    torch.testing.assert_close(lin.model_time(t, "int"), torch.tensor([999.0, 500.0, 0.0]))
    torch.testing.assert_close(lin.model_time(t, "frac1000"), torch.tensor([0.999, 0.5, 0.0]))
    tc = torch.tensor([1.0, 0.5, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(vpsde().model_time(tc, "cont999"), tc * 999)
    with pytest.raises(ValueError, match="does not fit"):
        lin.model_time(t, "cont999")
    with pytest.raises(ValueError, match="does not fit"):
        vpsde().model_time(tc, "int")
    with pytest.raises(ValueError, match="unknown time convention"):
        lin.model_time(t, "t")


def test_get_schedule_forms():
    a = get_schedule({"name": "scaled_linear", "beta_end": 0.02})
    b = get_schedule("scaled_linear", beta_end=0.02)
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod) and a.name == "scaled_linear"
    assert not torch.equal(a.alphas_cumprod, get_schedule("scaled_linear").alphas_cumprod)
    v = get_schedule({"name": "vpsde", "beta_max": 10.0})
    assert v.beta_max == 10.0 and get_schedule(v) is v
    assert get_solver("dpm++2m", {"name": "cosine"}, 5).order == 2


def test_errors():
    lin = linear()
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("euler", lin, 10)
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("sigmoid")
    with pytest.raises(ValueError, match="'name'"):
        get_schedule({"beta_end": 0.02})
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="steps"):
            get_solver("ddim", lin, bad)
    with pytest.raises(ValueError, match="steps"):
        get_solver("ddim", vpsde(), 0)
    with pytest.raises(ValueError, match="spacing"):
        get_solver("ddim", lin, 10, "uniform")
    with pytest.raises(ValueError, match="spacing"):
        get_solver("dpmsolver++", lin, 10, "karras")
    with pytest.raises(ValueError, match="spacing"):
        get_solver("ddim", vpsde(), 10, "leading")
    with pytest.raises(ValueError, match="discrete"):
        get_solver("ddpm", vpsde(), 10)
    s = get_solver("ddpm", lin, 10)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        s.step(s.init_state(x), 0, x, torch.randn(SHAPE))


def test_tensor_index_dtype_and_device_move():
    """A 0-d index tensor (for per-step graphs) gives the same result; bf16 in -> bf16 out, math in fp32."""
    sch = get_schedule("scaled_linear")
    net = _toy_net(3)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    outs = []
    for use_tensor in (False, True):
        s = get_solver("dpmsolver++", sch, 8, "trailing").to("cpu")
        x = x_T.clone()
        state = s.init_state(x)
        for i, t in enumerate(s.timesteps):
            x = s.step(state, torch.tensor(i) if use_tensor else i, x, net(x, t))
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    s = get_solver("ddim", sch, 8)
    xb = x_T.to(torch.bfloat16)
    eps = net(xb.double(), s.timesteps[0]).to(torch.bfloat16)
    out = s.step(s.init_state(xb), 0, xb, eps)
    ref = s.step(s.init_state(x_T), 0, xb.float(), eps.float())
    assert out.dtype == torch.bfloat16
    assert _rel_err(out.float(), ref, "bf16 step") < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_matches_eager():
    """Steps on the GPU, eager and replayed from a CUDA graph, against the float64 CPU run."""
    sch = get_schedule("linear")
    net = _toy_net(9)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    cpu = get_solver("dpm++3m", sch, 10, "leading")
    x = x_T.clone()
    st = cpu.init_state(x)
    for i, t in enumerate(cpu.timesteps):
        x = cpu.step(st, i, x, net(x, t))
    ref = x

    dev = torch.device("cuda")
    s = get_solver("dpm++3m", sch, 10, "leading").to(dev)
    net_g = _toy_net(9)  # evaluated on the CPU in float64; only the solver runs on the GPU
    x_eager = x_T.to(dev, torch.float32)
    st = s.init_state(x_eager)
    for i, t in enumerate(s.timesteps):
        x_eager = s.step(st, i, x_eager, net_g(x_eager.double().cpu(), t.cpu()).to(dev, torch.float32))
    assert _rel_err(x_eager.double().cpu(), ref, "cuda eager fp32") < 1e-5

    # Capture one step per index (as the sampler does), eps fed through a static buffer.
    x_static = x_T.to(dev, torch.float32).clone()
    eps_static = torch.zeros_like(x_static)
    st = s.init_state(x_static)
    graphs, outs = [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, then reset the history buffers
        s.step(st, 0, x_static, eps_static)
    torch.cuda.current_stream().wait_stream(side)
    for v in st.values():
        v.zero_()
    pool = torch.cuda.graph_pool_handle()
    for i in range(len(s)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs.append(s.step(st, i, x_static, eps_static))
        graphs.append(g)
    for v in st.values():
        v.zero_()
    x = x_T.to(dev, torch.float32)
    for i, t in enumerate(s.timesteps):
        x_static.copy_(x)
        eps_static.copy_(net_g(x.double().cpu(), t.cpu()).to(dev, torch.float32))
        graphs[i].replay()
        x = outs[i].clone()
    torch.testing.assert_close(x, x_eager, rtol=0, atol=0)

"""diffusers interop, offline, on tiny random diffusers models built here: DiTTransformer2DModel folders
into our DiT (parity with diffusers' forward) and back (export), any diffusers scheduler as the solver
(bit for bit with a plain diffusers loop at switch=0), latents decoded by a local AutoencoderKL, and the
DuoDiffPipeline helper. Skipped where diffusers is absent (the GPU machine)."""
import copy
import inspect
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from duodiff_fast.models import DiT, load_checkpoint, save_safetensors
from duodiff_fast.models.checkpoint import CheckpointError
from duodiff_fast.models.configs import create_model
from duodiff_fast.models.diffusers_io import (
    NumericsWarning,
    apply_numerics,
    diffusers_pos_embed,
    export_diffusers,
    load_diffusers_dit,
)
from duodiff_fast.sampling import AtTimestep
from duodiff_fast.sampling.diffusers_loop import make_model_fn, plan_scheduler, run_scheduler_loop
from duodiff_fast.sampling.schedules import get_schedule

# diffusers' schedulers call numpy on tensors, which numpy 2 flags; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

RTOL = 3e-5  # DESIGN §6 / tests/test_models.py: fp32, relative to the largest output magnitude
HEADS, HEAD_DIM, LAYERS, SIZE, PATCH, CLASSES = 2, 32, 2, 8, 2, 10  # head dim 32: one the Triton kernel takes
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)


def tiny_preset(num_classes=CLASSES, depth=LAYERS, learn_sigma=True):
    return dict(family="dit", kwargs=dict(input_size=SIZE, patch_size=PATCH, in_channels=4,
                                          hidden_size=HEADS * HEAD_DIM, depth=depth, num_heads=HEADS,
                                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=num_classes,
                                          learn_sigma=learn_sigma),
                time_convention="int", schedule=dict(name="linear", beta_start=1e-4, beta_end=0.02, T=1000),
                latent=True, latent_scale=0.18215, description="tiny diffusers DiT")


def tiny_diffusers_dit(seed=0, num_classes=CLASSES, norm_eps=1e-5, learn_sigma=True):
    """A random DiTTransformer2DModel with every parameter random (adaLN-Zero zeros would hide errors)
    and, as in every converted DiT, the same time/label embedder copied into each block."""
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                              out_channels=8 if learn_sigma else 4, num_layers=LAYERS, sample_size=SIZE,
                              patch_size=PATCH, num_embeds_ada_norm=num_classes, norm_eps=norm_eps)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        emb = m.transformer_blocks[0].norm1.emb.state_dict()
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(emb)
    return m.eval()


def assert_close_rel(out, ref, rtol=RTOL, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs()
    scale = ref.abs().max().item()
    print(f"{what}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}, max|ref| {scale:.3e}")
    assert err.max().item() <= rtol * scale, f"{what}: max err {err.max().item():.3e} > {rtol:g} * {scale:.3e}"


def inputs(B=3, seed=1, num_classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 417, 999][:B])
    y = torch.randint(0, num_classes, (B,), generator=g)
    return x, t, y


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    m = tiny_diffusers_dit()
    m.save_pretrained(root / "plain")
    m.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert os.path.isfile(root / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    return m, root


# -----------------------------------------------------------------------------
# 1. diffusers-format weights
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["grad", "ops", "ops-triton"])
@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_diffusers_folder_matches_diffusers_forward(dit_folder, layout, path, monkeypatch):
    ref_model, root = dit_folder
    if path == "ops-triton":
        if layout == "sharded":
            pytest.skip("the Triton path is checked once (the weights are the same)")
        monkeypatch.setenv("DUODIFF_BACKEND", "triton")
    ours = load_checkpoint(str(root / layout), tiny_preset())
    assert isinstance(ours, DiT) and ours.numerics == dict(time_freq_shift=1, mlp_norm_eps=1e-5)
    x, t, y = inputs()
    with torch.no_grad():
        ref = ref_model(x, timestep=t, class_labels=y).sample
    ctx = torch.enable_grad() if path == "grad" else torch.no_grad()
    with ctx:
        out = ours(x, t, y).detach()
    assert_close_rel(out, ref, what=f"{layout}/{path} conditional")
    # Guided call, DiTPipeline's way: [x, x] with labels [y, null], guidance on the latent channels.
    fn = make_model_fn(ours, ours, schedule="linear", y=y, cfg_scale=4.0)
    with ctx:
        guided = fn("deep", x, t[1]).detach()
    with torch.no_grad():
        both = ref_model(torch.cat([x, x]), timestep=t[1].expand(2 * len(x)),
                         class_labels=torch.cat([y, torch.full_like(y, CLASSES)])).sample
    cond, uncond = both[:, :4].chunk(2)
    ref_guided = torch.cat([uncond + 4.0 * (cond - uncond), both[: len(x), 4:]], dim=1)
    assert_close_rel(guided, ref_guided, what=f"{layout}/{path} guided")


def test_diffusers_numerics_are_not_the_original_dits(dit_folder):
    """The test above can fail: with the original DiT's numerics the same weights give another function."""
    ref_model, root = dit_folder
    ours = load_checkpoint(str(root / "plain"), tiny_preset())
    apply_numerics(ours, dict(time_freq_shift=0, mlp_norm_eps=1e-6))
    assert ours.numerics is None
    x, t, y = inputs()
    with torch.no_grad():
        err = (ours(x, t, y) - ref_model(x, timestep=t, class_labels=y).sample).abs().max().item()
    assert err > 1e-2, err


def test_pos_embed_matches_diffusers(dit_folder):
    ref_model, _ = dit_folder
    assert torch.equal(diffusers_pos_embed(HEADS * HEAD_DIM, SIZE // PATCH), ref_model.pos_embed.pos_embed)


def test_pipeline_root_and_no_preset(dit_folder, tmp_path):
    ref_model, root = dit_folder
    pipe = DiTPipeline(transformer=ref_model, vae=tiny_vae(), scheduler=DDIMScheduler(**LINEAR))
    pipe.save_pretrained(tmp_path / "pipe")
    a = load_checkpoint(str(tmp_path / "pipe"), tiny_preset())          # finds transformer/
    b = load_diffusers_dit(str(root / "plain"))                         # architecture from config.json
    assert b.schedule_spec["name"] == "linear" and b.time_convention == "int"
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_config_checked_against_preset(dit_folder):
    _, root = dit_folder
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(root / "plain"), tiny_preset(num_classes=12, depth=3))
    msg = str(e.value)
    print(msg)
    assert str(root / "plain") in msg and "tiny diffusers DiT" in msg
    assert "num_layers: folder 2 vs preset 3" in msg and "num_embeds_ada_norm: folder 10 vs preset 12" in msg
    with pytest.raises(CheckpointError, match="holds a DiT transformer, but preset 'uvit_cifar10_small_shallow'"):
        load_checkpoint(str(root / "plain"), "uvit_cifar10_small_shallow")


def test_unrepresentable_config_refused(tmp_path):
    m = tiny_diffusers_dit()
    m.save_pretrained(tmp_path / "gelu")
    cfg_path = tmp_path / "gelu" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, activation_fn="gelu")))
    with pytest.raises(CheckpointError, match="activation_fn='gelu'"):
        load_checkpoint(str(tmp_path / "gelu"), tiny_preset())


def test_per_block_embedders_refused(tmp_path):
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, out_channels=8,
                              num_layers=LAYERS, sample_size=SIZE, num_embeds_ada_norm=CLASSES)
    m.save_pretrained(tmp_path / "m")  # freshly initialised: every block has its own random embedder
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\..* differs from block 0"):
        load_checkpoint(str(tmp_path / "m"), tiny_preset())


def test_safetensors_round_trip_keeps_numerics(dit_folder, tmp_path):
    _, root = dit_folder
    ours = load_checkpoint(str(root / "plain"), tiny_preset())
    save_safetensors(ours, tmp_path / "ours.safetensors")
    preset = dict(tiny_preset(), cfg_channels=3)  # a preset's convention (DiT: 3) ...
    back = load_checkpoint(str(tmp_path / "ours.safetensors"), preset)
    assert back.numerics == ours.numerics
    assert ours.cfg_channels is None and back.cfg_channels is None  # ... gives way to diffusers' (all)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y), ours(x, t, y))


def _random_ours(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(tiny_preset(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table stays: export must handle our row-first one
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_export_trained_here_to_diffusers(tmp_path):
    """A model trained here (original DiT numerics, our row-first pos_embed): the exported folder loads in
    diffusers and computes our function with diffusers' time embedding (the warning says so)."""
    ours = _random_ours()
    with pytest.warns(NumericsWarning, match="127"):
        export_diffusers(ours, tmp_path / "export")
    theirs = DiTTransformer2DModel.from_pretrained(str(tmp_path / "export")).eval()
    assert theirs.config.norm_eps == 1e-6
    same = apply_numerics(copy.deepcopy(ours), dict(time_freq_shift=1, mlp_norm_eps=1e-6))
    x, t, y = inputs()
    with torch.no_grad():
        ref = theirs(x, timestep=t, class_labels=y).sample
        assert_close_rel(same(x, t, y), ref, what="export (diffusers numerics)")
        # and it is not what this model computes with the original embedding
        assert (ours(x, t, y) - ref).abs().max().item() > 1e-2
    back = load_checkpoint(str(tmp_path / "export"), tiny_preset())
    with torch.no_grad():
        assert_close_rel(back(x, t, y), ref, what="export -> load_checkpoint")


def test_export_of_diffusers_model_is_exact(dit_folder, tmp_path):
    ref_model, root = dit_folder
    ours = load_checkpoint(str(root / "plain"), tiny_preset())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericsWarning)
        export_diffusers(ours, tmp_path / "again")
    again = DiTTransformer2DModel.from_pretrained(str(tmp_path / "again")).eval()
    for k, v in ref_model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_export_refuses_to_overwrite(tmp_path):
    ours = _random_ours()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_diffusers(ours, out)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.warns(NumericsWarning):
        export_diffusers(ours, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no temporary folders left


def test_export_cli(tmp_path):
    import argparse

    from duodiff_fast import export
    ours = _random_ours()
    ckpt = tmp_path / "shallow.safetensors"
    save_safetensors(ours, ckpt)
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps(tiny_preset()))
    parser = argparse.ArgumentParser()
    export.add_cli(parser.add_subparsers())
    args = parser.parse_args(["export", "--format", "diffusers", "--model", str(spec), "--ckpt", str(ckpt),
                              "--out", str(tmp_path / "folder")])
    with pytest.warns(NumericsWarning):
        assert args.func(args) == 0
    theirs = DiTTransformer2DModel.from_pretrained(str(tmp_path / "folder"))
    assert theirs.config.num_layers == LAYERS
    # diffusers folder -> our safetensors, no --model needed; refuses to overwrite without --overwrite
    args = parser.parse_args(["export", "--format", "safetensors", "--ckpt", str(tmp_path / "folder"),
                              "--out", str(tmp_path / "back.safetensors")])
    assert args.func(args) == 0
    before = (tmp_path / "back.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        args.func(args)
    assert (tmp_path / "back.safetensors").read_bytes() == before
    back = load_checkpoint(str(tmp_path / "back.safetensors"), tiny_preset())
    assert back.numerics["time_freq_shift"] == 1
    args = parser.parse_args(["export", "--format", "diffusers", "--model", "uvit_shapes32_demo",
                              "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path / "u")])
    torch.save(create_model("uvit_shapes32_demo").state_dict(), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="needs a DiT model"):
        args.func(args)


# -----------------------------------------------------------------------------
# 2. any diffusers scheduler
# -----------------------------------------------------------------------------

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**LINEAR, clip_sample=False),
    "ddim_eta1": lambda: DDIMScheduler(**LINEAR, clip_sample=False),
    "ddpm": lambda: DDPMScheduler(**LINEAR, clip_sample=False),
    "ddpm_learned_range": lambda: DDPMScheduler(**LINEAR, clip_sample=False, variance_type="learned_range"),
    "dpmsolver++": lambda: DPMSolverMultistepScheduler(**LINEAR),
    "dpmsolver++_karras": lambda: DPMSolverMultistepScheduler(**LINEAR, use_karras_sigmas=True),
    "unipc": lambda: UniPCMultistepScheduler(**LINEAR),
    "euler": lambda: EulerDiscreteScheduler(**LINEAR),
    "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**LINEAR),
    "heun": lambda: HeunDiscreteScheduler(**LINEAR),
    "kdpm2": lambda: KDPM2DiscreteScheduler(**LINEAR),
}
STEP_KW = {"ddim_eta1": {"eta": 1.0}}


@pytest.fixture(scope="module")
def deep_model(dit_folder):
    _, root = dit_folder
    return load_checkpoint(str(root / "plain"), tiny_preset())


def plain_diffusers_loop(scheduler, model, steps, y, cfg, seed, batch, step_kwargs=None, full_output=False):
    """How a diffusers pipeline samples (DiTPipeline's guidance and learned-sigma split, with the
    init_noise_sigma scaling and the unscaled sample in step() of every other pipeline)."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = randn_tensor((batch, 4, SIZE, SIZE), generator=g, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = torch.cat([latents] * 2) if cfg else latents
        inp = scheduler.scale_model_input(inp, t)
        ts = t[None].expand(inp.shape[0])
        labels = torch.cat([y, torch.full_like(y, CLASSES)]) if cfg else y
        noise_pred = model(inp, ts, labels)
        if cfg:
            eps, rest = noise_pred[:, :4], noise_pred[:, 4:]
            cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
            noise_pred = torch.cat([uncond + cfg * (cond - uncond), rest[:batch]], dim=1)
        model_output = noise_pred if full_output else torch.split(noise_pred, 4, dim=1)[0]
        kw = dict(step_kwargs or {})
        if "generator" in inspect.signature(scheduler.step).parameters:
            kw["generator"] = g
        latents = scheduler.step(model_output, t, latents, **kw).prev_sample
    return latents


class NeverCalled(torch.nn.Module):
    def __init__(self, like):
        super().__init__()
        self.null_class = like.null_class

    def forward(self, *args):
        raise AssertionError("the shallow model ran at switch=0")


@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_loop_bit_for_bit_at_switch0(deep_model, name, cfg):
    steps, batch, seed = 6, 2, 0
    y = torch.tensor([3, 7])
    with torch.inference_mode():
        ref = plain_diffusers_loop(SCHEDULERS[name](), deep_model, steps, y, cfg, seed, batch, STEP_KW.get(name),
                                   full_output=name == "ddpm_learned_range")
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((batch, 4, SIZE, SIZE), generator=g)
        shallow = NeverCalled(deep_model)  # switch=0: the shallow model must not run
        fn = make_model_fn(shallow, deep_model, schedule="linear", y=y, cfg_scale=cfg)
        out = run_scheduler_loop(SCHEDULERS[name](), steps, 0, fn, noise, g, schedule="linear", learned_sigma=True,
                                 step_kwargs=STEP_KW.get(name))
    print(name, cfg, (out - ref).abs().max().item())
    assert torch.equal(out, ref)


class CallLog(torch.nn.Module):
    """Wraps a model and logs the (rounded) timestep of every call under its name."""

    def __init__(self, model, name, log):
        super().__init__()
        self.model, self.name, self.log = model, name, log
        for attr in ("null_class", "time_convention", "in_channels", "img_size", "num_classes", "learn_sigma"):
            setattr(self, attr, getattr(model, attr))

    def forward(self, x, t, y=None):
        self.log.append((self.name, round(float(t[0]), 2)))
        return self.model(x, t, y)


@pytest.mark.parametrize("name,switch,k_steps,k_evals", [
    ("ddim", 0.4, 2, 2), ("dpmsolver++", 0.6, 3, 3), ("heun", 0.4, 2, 4), ("kdpm2", 0.6, 3, 6),
    ("heun", 1.0, 5, 9), ("euler", AtTimestep(500), 2, 2)])
def test_switch_runs_shallow_model_first(deep_model, name, switch, k_steps, k_evals):
    """`switch` counts solver steps; all evaluations of a step (Heun, KDPM2: two) use one model."""
    log = []
    torch.manual_seed(5)
    shallow_net = DiT(**dict(tiny_preset()["kwargs"], depth=1)).eval()
    shallow, deep = CallLog(shallow_net, "shallow", log), CallLog(deep_model, "deep", log)
    plan = plan_scheduler(SCHEDULERS[name](), 5, switch, schedule="linear", learned_sigma=True)
    assert (plan.k, plan.shallow_evaluations, plan.n_steps) == (k_steps, k_evals, 5)
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    fn = make_model_fn(shallow, deep, schedule="linear", y=y)
    from duodiff_fast.sampling import SampleTrace
    trace = SampleTrace()
    with torch.inference_mode():
        out = run_scheduler_loop(SCHEDULERS[name](), 5, switch, fn, noise, schedule="linear", learned_sigma=True,
                                 trace=trace)
        deep_only = run_scheduler_loop(SCHEDULERS[name](), 5, 0.0, make_model_fn(shallow, deep, schedule="linear",
                                                                                  y=y),
                                       noise, schedule="linear", learned_sigma=True)
    names = [n for n, _ in log[: plan.evaluations]]
    assert names == ["shallow"] * k_evals + ["deep"] * (plan.evaluations - k_evals), log
    assert trace.models == names and len(trace.timesteps) == plan.evaluations
    assert [t for _, t in log[: plan.evaluations]] == [round(t, 2) for t in plan.timesteps]
    assert trace.seconds["shallow"] > 0 and (trace.seconds["deep"] > 0) == (k_evals < plan.evaluations)
    assert not torch.equal(out, deep_only)
    if isinstance(switch, AtTimestep):
        starts = [t for t, s in zip(plan.timesteps, plan.step_of_eval, strict=True) if s < plan.k]
        assert all(t >= 500 for t in starts) and plan.timesteps[plan.shallow_evaluations] < 500


def test_user_scheduler_left_untouched(deep_model):
    sched = DPMSolverMultistepScheduler(**LINEAR)
    sched.set_timesteps(3)
    before = sched.timesteps.clone()
    noise = torch.randn(1, 4, SIZE, SIZE)
    fn = make_model_fn(deep_model, deep_model, schedule="linear", y=torch.tensor([1]))
    with torch.inference_mode():
        run_scheduler_loop(sched, 7, 0.0, fn, noise, schedule="linear", learned_sigma=True)
    assert torch.equal(sched.timesteps, before) and sched.step_index is None


@pytest.mark.parametrize("make,match", [
    (lambda: DDIMScheduler(**dict(LINEAR, num_train_timesteps=500)), "num_train_timesteps=500"),
    (lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
     "beta_schedule='scaled_linear'"),
    (lambda: DDIMScheduler(**LINEAR, rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    (lambda: DDIMScheduler(**LINEAR, prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    (lambda: EulerDiscreteScheduler(**LINEAR, prediction_type="sample"), "prediction_type='sample'"),
    (lambda: EulerDiscreteScheduler(**LINEAR, timestep_type="continuous"), "timestep_type='continuous'"),
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(), "no alphas_cumprod"),
])
def test_mismatched_scheduler_refused(make, match):
    with pytest.raises(ValueError, match=match) as e:
        plan_scheduler(make(), 10, 0.3, schedule="linear", learned_sigma=True)
    print(e.value)


def test_scheduler_refusals_that_depend_on_the_model():
    with pytest.raises(ValueError, match="variance_type='learned_range' needs a model that predicts its variance"):
        plan_scheduler(SCHEDULERS["ddpm_learned_range"](), 10, schedule="linear", learned_sigma=False)
    with pytest.raises(ValueError, match="continuous 'vpsde' schedule"):
        plan_scheduler(DDIMScheduler(), 10, schedule="vpsde")
    with pytest.raises(TypeError, match="diffusers scheduler instance"):
        plan_scheduler("euler", 10, schedule="linear")
    no_null = DiT(**dict(tiny_preset()["kwargs"], class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="cfg_scale=2 but the shallow model has no null_class"):
        make_model_fn(no_null, no_null, schedule="linear", y=torch.tensor([1]), cfg_scale=2.0)
    # the U-ViT latent presets' scaled-linear schedule is accepted by a scaled-linear scheduler
    plan_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10,
                   schedule=get_schedule("scaled_linear"))


# -----------------------------------------------------------------------------
# 3. latents -> images with a local VAE
# -----------------------------------------------------------------------------

def tiny_vae(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=2 * SIZE)
    return vae.eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    return vae, str(root / "vae")


def test_decode_latents_matches_vae_decode(vae_folder):
    from duodiff_fast.vae import decode_latents, load_vae
    vae, folder = vae_folder
    latents = torch.randn(5, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        img = vae.decode(latents / 0.18215).sample
    want = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    loaded = load_vae(folder)
    for bs in (1, 2, 5):
        got = decode_latents(loaded, latents, latent_scale=0.18215, batch_size=bs)
        assert got.shape == (5, 2 * SIZE, 2 * SIZE, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, bs
    # the scale is applied: another scale gives other images
    with pytest.warns(UserWarning, match="scaling_factor=0.18215, the model's preset latent_scale=0.5"):
        other = decode_latents(loaded, latents, latent_scale=0.5, batch_size=5)
    assert np.abs(other.astype(int) - want.astype(int)).max() > 10


def test_decode_and_save(vae_folder, tmp_path):
    from duodiff_fast.vae import decode_and_save
    _, folder = vae_folder
    latents = np.random.default_rng(0).standard_normal((5, 4, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(5, dtype=np.int64)
    np.savez(tmp_path / "samples.npz", latents=latents, labels=labels)
    res = decode_and_save(str(tmp_path), folder, latent_scale=0.18215, device="cpu", batch_size=2, progress=False)
    with np.load(res["samples"]) as z:
        assert sorted(z.files) == ["arr_0", "labels"]
        assert z["arr_0"].shape == (5, 2 * SIZE, 2 * SIZE, 3) and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["labels"], labels)
        images = z["arr_0"]
    with np.load(res["latents"]) as z:
        assert np.array_equal(z["latents"], latents) and np.array_equal(z["labels"], labels)
    from PIL import Image
    pngs = sorted(os.listdir(res["images"]))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(os.path.join(res["images"], "000003.png"))), images[3])
    assert os.path.isfile(res["grid"])
    # samples.npz now holds images: a second decode is refused and changes nothing
    before = Path(res["samples"]).read_bytes()
    with pytest.raises(ValueError, match="expected 'latents'"):
        decode_and_save(str(tmp_path), folder, latent_scale=0.18215, device="cpu", progress=False)
    assert Path(res["samples"]).read_bytes() == before


def test_vae_folder_checks(vae_folder, tmp_path):
    from duodiff_fast.vae import check_vae_folder
    _, folder = vae_folder
    assert check_vae_folder(folder, latent_channels=4)["latent_channels"] == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        check_vae_folder(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="latent_channels=4, the model samples 3"):
        check_vae_folder(folder, latent_channels=3)
    (tmp_path / "notvae").mkdir()
    (tmp_path / "notvae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel.*AutoencoderKL"):
        check_vae_folder(str(tmp_path / "notvae"))


# -----------------------------------------------------------------------------
# 4. DuoDiffPipeline
# -----------------------------------------------------------------------------

def test_pipeline_matches_dit_pipeline(tmp_path, vae_folder):
    """switch=0 with DDIM: the same images as diffusers' own DiTPipeline (1000 classes: DiTPipeline's null
    label is hard-coded to 1000), up to 8-bit quantisation."""
    from duodiff_fast.pipeline import DuoDiffPipeline
    vae, vae_dir = vae_folder
    transformer = tiny_diffusers_dit(num_classes=1000)
    transformer.save_pretrained(tmp_path / "transformer")
    labels = [3, 999]
    ref = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**LINEAR, clip_sample=False))
    ref.set_progress_bar_config(disable=True)
    theirs = ref(labels, guidance_scale=4.0, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    pipe = DuoDiffPipeline.from_local(str(tmp_path / "transformer"), scheduler=DDIMScheduler(**LINEAR, clip_sample=False),
                                      vae=vae_dir, switch=0.0)
    ours = pipe(labels, guidance_scale=4.0, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    assert ours.shape == theirs.shape == (2, 2 * SIZE, 2 * SIZE, 3)
    err = np.abs(ours - theirs).max()
    print("pipeline vs DiTPipeline", err)
    assert err <= 1.0 / 255 + 1e-6


def test_pipeline_outputs_and_switch(dit_folder, vae_folder, tmp_path):
    from duodiff_fast.pipeline import DuoDiffPipeline
    _, root = dit_folder
    _, vae_dir = vae_folder
    shallow = _random_ours(seed=3, depth=1)
    save_safetensors(shallow, tmp_path / "shallow.safetensors")
    pipe = DuoDiffPipeline.from_local(str(root / "plain"), str(tmp_path / "shallow.safetensors"),
                                      shallow_preset=tiny_preset(depth=1), scheduler=HeunDiscreteScheduler(**LINEAR),
                                      vae=vae_dir, switch=0.5)
    out = pipe([1, 2, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 3 and out.images[0].size == (2 * SIZE, 2 * SIZE)
    assert out.trace.models == ["shallow"] * 4 + ["deep"] * 3  # 2 Heun steps of 2 evaluations, then 2 + 1
    lat = pipe([1, 2, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    pt = pipe([1, 2, 3], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert lat.images.shape == (3, 4, SIZE, SIZE) and pt.images.shape == (3, 3, 2 * SIZE, 2 * SIZE)
    assert not lat.images.is_inference() and not pt.images.is_inference()
    assert np.array_equal(np.asarray(out.images[1]), (pt.images[1].permute(1, 2, 0).numpy() * 255).round())
    # the library's own solver by name, through DuoSampler
    pipe_ddim = DuoDiffPipeline(pipe.shallow, pipe.deep, "ddim", pipe.vae, switch=0.5)
    res = pipe_ddim([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert res.images.shape == (2, 2 * SIZE, 2 * SIZE, 3) and res.trace.models == ["shallow"] * 2 + ["deep"] * 2
    no_vae = DuoDiffPipeline(pipe.shallow, pipe.deep, DDIMScheduler(**LINEAR))
    with pytest.raises(ValueError, match="need a VAE"):
        no_vae([1])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\)"):
        no_vae([10], output_type="latent")


def test_readme_example(tmp_path, monkeypatch):
    """The README's "From diffusers" Python example, verbatim (see /work/notes/diffusers-readme.md): tiny
    random models made on the spot, end to end, offline."""
    monkeypatch.chdir(tmp_path)
    # --- README example start ---
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler

    from duodiff_fast.pipeline import DuoDiffPipeline

    # Stand-ins for a downloaded DiT pipeline: tiny random transformers (deep: 4 blocks, shallow: 1) and a
    # tiny VAE, saved the diffusers way.
    torch.manual_seed(0)
    for name, layers in (("deep", 4), ("shallow", 1)):
        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, out_channels=8,
                                    num_layers=layers, sample_size=8, num_embeds_ada_norm=10)
        for block in dit.transformer_blocks[1:]:  # converted DiT weights share one time/label embedder
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
        dit.save_pretrained(f"tiny/{name}")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4).save_pretrained("tiny/vae")

    pipe = DuoDiffPipeline.from_local("tiny/deep", "tiny/shallow", vae="tiny/vae", switch=0.4,
                                      scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"))
    out = pipe(class_labels=[1, 7], num_inference_steps=10, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("sample0.png")
    print(out.trace.models)  # ['shallow', 'shallow', 'shallow', 'shallow', 'deep', ...]
    # --- README example end ---
    assert os.path.isfile(tmp_path / "sample0.png") and len(out.images) == 2
    assert out.trace.models == ["shallow"] * 4 + ["deep"] * 6


# -----------------------------------------------------------------------------
# 5. schedulers built for a model's schedule; time conventions; DuoSampler wiring
# -----------------------------------------------------------------------------

def test_make_scheduler():
    from duodiff_fast.sampling.diffusers_loop import make_scheduler
    s = make_scheduler("DDIMScheduler", "linear")
    assert (s.config.beta_schedule, s.config.clip_sample, s.config.prediction_type) == ("linear", False, "epsilon")
    s = make_scheduler("UniPCMultistepScheduler", get_schedule("scaled_linear"), solver_order=3)
    assert s.config.beta_schedule == "scaled_linear" and s.config.solver_order == 3
    plan_scheduler(make_scheduler("HeunDiscreteScheduler", "cosine"), 4, schedule="cosine")
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'NoSuchScheduler'.*UniPCMultistepScheduler"):
        make_scheduler("NoSuchScheduler", "linear")
    with pytest.raises(ValueError, match="continuous"):
        make_scheduler("DDIMScheduler", "vpsde")


def test_time_convention_of_a_frac1000_uvit():
    """A U-ViT fed t/1000 (the shipped demo weights, declared 'frac1000' here: the check is about the time
    mapping, not the samples): diffusers' DDIM through the loop agrees with the library's own DDIM (float64
    coefficients vs diffusers' float32 tables), which it could not if the network time were mapped wrongly."""
    from duodiff_fast.demo import load_demo_pair
    from duodiff_fast.sampling import DuoSampler
    from duodiff_fast.sampling.diffusers_loop import make_scheduler
    _, deep = load_demo_pair()
    deep.time_convention = "frac1000"
    y = torch.tensor([0, 5])
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    own = DuoSampler(deep, deep, solver="ddim", steps=10, switch=0, cfg_scale=None).sample(noise=noise, y=y)
    fn = make_model_fn(deep, deep, schedule=deep.schedule_spec, y=y)
    with torch.inference_mode():
        theirs = run_scheduler_loop(make_scheduler("DDIMScheduler", deep.schedule_spec), 10, 0, fn, noise,
                                    schedule=deep.schedule_spec)
        wrong = run_scheduler_loop(make_scheduler("DDIMScheduler", deep.schedule_spec), 10, 0,
                                   make_model_fn(deep, deep, schedule=deep.schedule_spec, y=y, time_convention="int"),
                                   noise, schedule=deep.schedule_spec)
    assert_close_rel(theirs, own, rtol=1e-4, what="diffusers DDIM vs own DDIM, demo U-ViT")
    assert (wrong - own).abs().max().item() > 0.05


def _duosampler_takes_schedulers():
    from duodiff_fast.sampling import duo
    return "run_scheduler_loop" in inspect.getsource(duo)


@pytest.mark.skipif(not _duosampler_takes_schedulers(),
                    reason="DuoSampler(solver=<diffusers scheduler>) is not wired into sampling/duo.py yet")
@pytest.mark.parametrize("name", ["ddim", "euler_ancestral", "heun", "dpmsolver++"])
def test_duosampler_with_a_diffusers_scheduler(deep_model, name):
    from duodiff_fast.sampling import DuoSampler
    y = torch.tensor([3, 7])
    with torch.inference_mode():
        ref = plain_diffusers_loop(SCHEDULERS[name](), deep_model, 6, y, 3.0, 0, 2)
    sampler = DuoSampler(deep_model, deep_model, solver=SCHEDULERS[name](), steps=6, switch=0, cfg_scale=3.0)
    out = sampler.sample(n=2, y=y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)
    shallow = DiT(**dict(tiny_preset()["kwargs"], depth=1)).eval()
    sampler = DuoSampler(shallow, deep_model, solver=SCHEDULERS[name](), steps=6, switch=0.5)
    sampler.sample(n=2, y=y, generator=torch.Generator().manual_seed(0))
    per_step = 2 if name == "heun" else 1
    assert sampler.trace.models[: 3 * per_step] == ["shallow"] * 3 * per_step
    assert set(sampler.trace.models[3 * per_step:]) == {"deep"}


# -----------------------------------------------------------------------------
# 6. the command line, as a user runs it: sample --vae, --solver diffusers:<Scheduler>, export
# -----------------------------------------------------------------------------

def test_sample_cli_decodes_latents_with_a_local_vae_and_takes_a_diffusers_scheduler(dit_folder, vae_folder,
                                                                                      tmp_path, capsys):
    import numpy as np

    from duodiff_fast.cli import main
    _, root = dit_folder
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps(tiny_preset()))
    shallow = tmp_path / "shallow.safetensors"
    save_safetensors(DiT(**dict(tiny_preset()["kwargs"], depth=1)), shallow)
    shallow_spec = tmp_path / "shallow.json"
    shallow_spec.write_text(json.dumps(tiny_preset(depth=1)))
    out = tmp_path / "s"
    code = main(["sample", "--deep", str(spec), "--deep-ckpt", str(root / "plain"), "--shallow", str(shallow_spec),
                 "--shallow-ckpt", str(shallow), "--switch", "0.5", "--steps", "4", "--n", "5", "--batch-size", "2",
                 "--solver", "diffusers:UniPCMultistepScheduler", "--vae", vae_folder[1], "--out", str(out)])
    assert code == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (5, 2 * SIZE, 2 * SIZE, 3) and z["arr_0"].dtype == np.uint8
    with np.load(out / "latents.npz") as z:
        assert z["latents"].shape == (5, 4, SIZE, SIZE)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["vae"] == vae_folder[1] and meta["solver"] == "diffusers:UniPCMultistepScheduler"
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 5


def test_sample_cli_refuses_a_bad_vae_before_sampling(dit_folder, tmp_path, capsys):
    from duodiff_fast.cli import main
    _, root = dit_folder
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps(tiny_preset()))
    (tmp_path / "notvae").mkdir()
    code = main(["sample", "--deep", str(spec), "--deep-ckpt", str(root / "plain"), "--n", "2", "--steps", "2",
                 "--vae", str(tmp_path / "notvae"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "notvae" in err
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_export_through_the_entry_point(tmp_path, capsys):
    from duodiff_fast.cli import main
    ckpt = tmp_path / "m.safetensors"
    save_safetensors(_random_ours(), ckpt)
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps(tiny_preset()))
    with pytest.warns(NumericsWarning):
        assert main(["export", "--format", "diffusers", "--model", str(spec), "--ckpt", str(ckpt),
                     "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "config.json").is_file()
    assert main(["export", "--format", "diffusers", "--model", str(spec), "--ckpt", str(ckpt),
                 "--out", str(tmp_path / "f")]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err

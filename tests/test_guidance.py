"""Guidance conventions against the official samplers (fixture from tools/make_golden.py --only guidance).

DiT's sample.py guides with `forward_with_cfg`: diffusers' formula `uncond + w (cond - uncond)` on the first
3 of its 4 latent eps channels, the 4th kept conditional. U-ViT's eval scripts use `cond + s (cond - uncond)`
on every channel, i.e. w = 1 + s. DuoSampler follows each family by default (`cfg_channels`).
"""
import os

import pytest
import torch

from duodiff_fast.models import DiT, UViT, create_model
from duodiff_fast.sampling import DuoSampler, get_schedule

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "guidance.pt")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def _model(cls, entry, **extra):
    m = cls(**entry["config"], **extra)
    m.load_state_dict(entry["state_dict"], strict=True)
    return m.eval()


def _close(got, want, what):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{what}: max err {err:.3e} (max |want| {scale:.3e})")
    assert err <= 1e-5 * scale, f"{what}: max err {err:.3e} > 1e-5 * {scale:.3e}"


def test_dit_default_guides_three_channels_like_forward_with_cfg(fx):
    e = fx["dit"]
    dit = _model(DiT, e)
    s = DuoSampler(dit, dit, schedule=get_schedule("linear"), steps=10, switch=0, cfg_scale=e["cfg_scale"])
    assert s.cfg_channels == 3
    got = s.eps(dit, e["x"], e["t"], e["y"])
    _close(got, e["eps"], "dit cfg_channels=3 vs official forward_with_cfg")


def test_dit_all_channels_is_diffusers_convention_and_differs_on_channel_3(fx):
    e = fx["dit"]
    dit = _model(DiT, e)
    s = DuoSampler(dit, dit, schedule=get_schedule("linear"), steps=10, switch=0, cfg_scale=e["cfg_scale"],
                   cfg_channels=None)
    got = s.eps(dit, e["x"], e["t"], e["y"])
    _close(got[:, :3], e["eps"][:, :3], "dit guided channels")
    with torch.no_grad():
        t = torch.full((3,), float(e["t"]))
        cond = dit(e["x"], t, e["y"])[:, :4]
        uncond = dit(e["x"], t, torch.full_like(e["y"], dit.null_class))[:, :4]
    _close(got, uncond + e["cfg_scale"] * (cond - uncond), "dit all channels vs diffusers formula")
    assert (got[:, 3] - e["eps"][:, 3]).abs().max() > 1e-3  # the official sampler leaves channel 3 unguided


def test_uvit_upstream_scale_s_is_w_equal_one_plus_s(fx):
    e = fx["uvit"]
    uvit = _model(UViT, e, time_convention="cont999")
    w = 1.0 + e["upstream_scale"]
    s = DuoSampler(uvit, uvit, schedule=get_schedule("vpsde"), steps=10, switch=0, cfg_scale=w)
    assert s.cfg_channels is None
    got = s.eps(uvit, e["x"], e["t"], e["y"])
    _close(got, e["eps"], "uvit w = 1 + s vs official cond + s (cond - uncond)")
    # Passing upstream's s itself as w would give weaker guidance than none at all (w < 1).
    weak = DuoSampler(uvit, uvit, schedule=get_schedule("vpsde"), steps=10, switch=0,
                      cfg_scale=e["upstream_scale"]).eps(uvit, e["x"], e["t"], e["y"])
    assert (weak - e["eps"]).abs().max() > 1e-3


def test_presets_carry_recommended_scale_in_diffusers_convention():
    assert create_model("uvit_imagenet256_large_shallow").recommended_cfg_scale == pytest.approx(1.4)
    assert create_model("uvit_imagenet512_huge_shallow").recommended_cfg_scale == pytest.approx(1.7)
    dit = create_model("dit_s_2_shallow")
    assert dit.recommended_cfg_scale == 4.0 and dit.cfg_channels == 3
    assert create_model("uvit_cifar10_small_shallow").recommended_cfg_scale is None


def test_cfg_scale_preset_uses_the_recommended_value():
    torch.manual_seed(0)
    shallow = create_model("dit_s_8_shallow")
    s = DuoSampler(shallow, shallow, steps=2, switch=0, cfg_scale="preset")
    assert s.cfg_scale == 4.0 and s.cfg_channels == 3
    with pytest.raises(ValueError, match="recommends no guidance"):
        m = create_model("uvit_imagenet64_mid_shallow")
        DuoSampler(m, m, steps=2, cfg_scale="preset")

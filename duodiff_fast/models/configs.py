"""Named presets: every official U-ViT and DiT configuration and the DuoDiff shallow companion of each.

A preset is a dict:
  family          'uvit' | 'dit'
  kwargs          the official constructor keywords (exactly what the upstream config passes)
  time_convention how the sampler feeds t to the net: 'int' (integer t as is), 'frac1000' (t/1000),
                  'cont999' (continuous t in (0, 1] passed as t * 999, official U-ViT VP-SDE models)
  schedule        dict(name=..., **parameters) of the training noise schedule
  latent          True when the model works on SD KL-f8 VAE latents (scaled by latent_scale)
  description     one line
and optionally null_class (overrides the class default; None = no unconditional label), latent_scale
(VAE latent scaling), cfg_scale (the recommended classifier-free guidance scale, always in diffusers'
convention `uncond + w (cond - uncond)`: upstream U-ViT writes `cond + s (cond - uncond)`, i.e.
w = 1 + s, so its ImageNet-256 s=0.4 is 1.4 here), cfg_channels (how many leading output channels the
family's official sampler guides: DiT's `forward_with_cfg` guides 3 of its 4 latent channels, U-ViT all:
None) and, on companions, shallow_of (the deep preset's name).
`<name>_shallow` has the same width/heads/patch and 3 blocks (U-ViT depth=3: 1 in, mid, 1 out).

Not included: the MS-COCO text-to-image U-ViT (libs/uvit_t2i.py), a different architecture (CLIP text
tokens instead of a label token).
"""
import copy

import torch.nn as nn

from .dit import DiT
from .uvit import UViT

SHALLOW_DEPTH = 3
LATENT_SCALE = 0.18215  # Stable Diffusion KL-f8 VAE, used by U-ViT latent models and DiT

# U-ViT pixel models and its train_ldm.py latent models: continuous-time VP-SDE, net called with t * 999.
VPSDE = dict(name="vpsde", beta_min=0.1, beta_max=20.0)
# U-ViT train_ldm_discrete.py models: SD scaled-linear betas. Upstream indexes its schedule from 1:
# the net sees n in {1..1000} where alpha_bar(n) = prod(1 - beta[:n]), i.e. t_model = t_index + 1.
SCALED_LINEAR = dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012, T=1000,
                     t_offset=1)
# DiT (and DuoDiff training): DDPM linear betas, integer t in [0, 999].
LINEAR = dict(name="linear", beta_start=1e-4, beta_end=0.02, T=1000)


def _uvit(img_size, patch_size, embed_dim, depth, num_heads, num_classes, in_chans=3, conv=True):
    kw = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=num_classes)
    if in_chans != 3:
        kw["in_chans"] = in_chans
    if not conv:
        kw["conv"] = False
    return kw


def _latent_uvit(image, patch, width, depth, size, discrete, upstream_s):
    """A U-ViT ImageNet latent preset row. 1001 labels, label 1000 = unconditional. Upstream guides with
    cond + s (cond - uncond), s=0.4 at 256 and 0.7 at 512 (configs/imagenet{256,512}_uvit_*.py): that is
    w = 1 + s in our (diffusers') convention. U-ViT-H models are the discrete ones (train_ldm_discrete.py,
    t in 1..1000, no final conv); U-ViT-L the continuous VP-SDE ones (train_ldm.py)."""
    grid = image // 8
    name = f"uvit_imagenet{image}_{'huge' if discrete else 'large'}"
    kwargs = _uvit(grid, patch, width, depth, 16, 1001, in_chans=4, conv=not discrete)
    how = "discrete t in 1..1000 (train_ldm_discrete.py)" if discrete else "continuous VP-SDE (train_ldm.py)"
    desc = (f"U-ViT-{size}/{patch}, ImageNet {image} latent 4x{grid}x{grid}, {how}, guidance {1 + upstream_s:g} "
            f"(upstream s={upstream_s:g})")
    return (name, kwargs, "int" if discrete else "cont999", SCALED_LINEAR if discrete else VPSDE, True,
            {"cfg_scale": round(1 + upstream_s, 6)}, desc)


# (name, kwargs, time_convention, schedule, latent, extra, description); one row per official config.
_UVIT = [
    ("uvit_cifar10_small", _uvit(32, 2, 512, 12, 8, -1), "cont999", VPSDE, False, {},
     "U-ViT-S/2, CIFAR-10 32x32 unconditional (configs/cifar10_uvit_small.py)"),
    ("uvit_celeba64_small", _uvit(64, 4, 512, 12, 8, -1), "cont999", VPSDE, False, {},
     "U-ViT-S/4, CelebA 64x64 unconditional (configs/celeba64_uvit_small.py)"),
    # Trained without label dropout: every one of the 1000 labels is a real class, no CFG.
    ("uvit_imagenet64_mid", _uvit(64, 4, 768, 16, 12, 1000), "cont999", VPSDE, False, {"null_class": None},
     "U-ViT-M/4, ImageNet 64x64 class-conditional (configs/imagenet64_uvit_mid.py)"),
    ("uvit_imagenet64_large", _uvit(64, 4, 1024, 20, 16, 1000), "cont999", VPSDE, False, {"null_class": None},
     "U-ViT-L/4, ImageNet 64x64 class-conditional (configs/imagenet64_uvit_large.py)"),
    # 1001 labels, label 1000 = unconditional (see _latent_uvit).
    _latent_uvit(256, 2, 1024, 20, "L", False, 0.4),
    _latent_uvit(256, 2, 1152, 28, "H", True, 0.4),
    _latent_uvit(512, 4, 1024, 20, "L", False, 0.7),
    _latent_uvit(512, 4, 1152, 28, "H", True, 0.7),
]
# DiT's sample.py draws its images with cfg-scale 4.0 (its FID-50K runs use 1.5); the scale multiplies
# (cond - uncond) exactly as diffusers does. forward_with_cfg guides the first 3 of the 4 eps channels.
DIT_CFG_SCALE = 4.0
DIT_CFG_CHANNELS = 3

# Official DiT sizes: name -> (depth, hidden_size, num_heads).
_DIT_SIZES = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "s": (12, 384, 6)}


def _dit(size, patch_size, input_size=32):
    depth, hidden, heads = _DIT_SIZES[size]
    return dict(input_size=input_size, patch_size=patch_size, in_channels=4, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)


# Not official U-ViT checkpoints: DuoDiff's own recipe (DESIGN.md §2: linear betas, net fed t/1000).
_DUODIFF = [
    ("duodiff_cifar10_small", _uvit(32, 2, 512, 12, 8, -1), "frac1000",
     "U-ViT-S/2 as DuoDiff trains it on CIFAR-10: linear betas 1e-4..0.02, net fed t/1000"),
    # The demo pair shipped in duodiff_fast/assets (trained on the built-in Shapes data, styles 'bold' then
    # 'plain', README):
    # 10 classes + label 10 as the null class for guidance, 4x4 patches -> 64 tokens + 2. Fed integer t
    # (fed t / 1000, a 128-wide sinusoidal embedding moves little over the whole range) and with a
    # std-1 position table (UViT's pos_embed_std: lets the head pass each patch's noise norm through).
    ("uvit_shapes32_demo", dict(_uvit(32, 4, 128, 12, 4, 11), pos_embed_std=1.0), "int",
     "small U-ViT (13 blocks, width 128) for the built-in Shapes data, 32x32, 10 classes + null"),
]


def _build_presets():
    presets = {}
    for name, kwargs, tc, sched, latent, extra, desc in _UVIT:
        presets[name] = dict(family="uvit", kwargs=kwargs, time_convention=tc, schedule=dict(sched),
                             latent=latent, description=desc, **extra)
        if latent:
            presets[name]["latent_scale"] = LATENT_SCALE
    for size in _DIT_SIZES:
        for p in (2, 4, 8):
            presets[f"dit_{size}_{p}"] = dict(
                family="dit", kwargs=_dit(size, p), time_convention="int", schedule=dict(LINEAR), latent=True,
                latent_scale=LATENT_SCALE, cfg_scale=DIT_CFG_SCALE, cfg_channels=DIT_CFG_CHANNELS,
                description=f"DiT-{size.upper()}/{p}, ImageNet 256 latent 4x32x32, 1000 classes "
                            "(+ null label)")
    presets["dit_xl_2_512"] = dict(
        family="dit", kwargs=_dit("xl", 2, input_size=64), time_convention="int", schedule=dict(LINEAR),
        latent=True, latent_scale=LATENT_SCALE, cfg_scale=DIT_CFG_SCALE, cfg_channels=DIT_CFG_CHANNELS,
        description="DiT-XL/2, ImageNet 512 latent 4x64x64, 1000 classes (+ null label)")
    for name, kwargs, tc, desc in _DUODIFF:
        presets[name] = dict(family="uvit", kwargs=kwargs, time_convention=tc, schedule=dict(LINEAR),
                             latent=False, description=desc, official=False)
    for name in list(presets):
        shallow = copy.deepcopy(presets[name])
        shallow["kwargs"]["depth"] = SHALLOW_DEPTH
        shallow["description"] = f"DuoDiff shallow companion of {name}: same width/heads/patch, 3 blocks"
        shallow["shallow_of"] = name
        presets[f"{name}_shallow"] = shallow
    return presets


PRESETS = _build_presets()

_FAMILIES = {"uvit": UViT, "dit": DiT}


def list_presets(family=None):
    """Sorted preset names, optionally of one family ('uvit' or 'dit')."""
    return sorted(n for n, p in PRESETS.items() if family is None or p["family"] == family)


def get_preset(name_or_dict):
    """A deep copy of a preset (by name), or the dict itself checked."""
    if isinstance(name_or_dict, dict):
        preset = copy.deepcopy(name_or_dict)
    else:
        if name_or_dict not in PRESETS:
            raise KeyError(f"unknown preset {name_or_dict!r}; known: {', '.join(list_presets())}")
        preset = copy.deepcopy(PRESETS[name_or_dict])
    if preset.get("family") not in _FAMILIES:
        raise ValueError(f"preset needs family in {sorted(_FAMILIES)}, got {preset.get('family')!r}")
    return preset


def create_model(name_or_dict, **overrides) -> nn.Module:
    """Build a model from a preset name (see `list_presets()`) or a preset dict; keyword overrides go
    to the constructor (e.g. depth=3, num_classes=10, time_convention='frac1000')."""
    preset = get_preset(name_or_dict)
    kwargs = dict(preset.get("kwargs", {}))
    kwargs.setdefault("time_convention", preset.get("time_convention", "int"))
    if "null_class" in preset:
        kwargs.setdefault("null_class", preset["null_class"])
    kwargs.update(overrides)
    model = _FAMILIES[preset["family"]](**kwargs)
    # Samplers read the training schedule from here (DuoSampler's default `schedule`).
    model.schedule_spec = dict(preset["schedule"]) if "schedule" in preset else None
    model.preset = name_or_dict if isinstance(name_or_dict, str) else None
    # Guidance defaults: the recommended scale (diffusers' convention) and the guided channels.
    model.recommended_cfg_scale = preset.get("cfg_scale")
    if "cfg_channels" in preset:
        model.cfg_channels = preset["cfg_channels"]
    return model


def load_spec(model) -> dict:
    """A preset name, a path to a JSON spec (what `duodiff-fast train` writes as model.json), or a spec
    dict -> a checked spec dict (a copy). Preset names are remembered under 'preset'. The one place that
    reads model specs (train, sample, eval and the demo all call it)."""
    import os

    from .._io import read_json_object

    if isinstance(model, dict):
        return get_preset(model)
    if isinstance(model, (str, os.PathLike)) and (str(model).endswith(".json") or os.path.isfile(model)):
        return get_preset(read_json_object(model, "a model spec (what `duodiff-fast train` writes as "
                                                  "model.json)"))
    if not isinstance(model, str):
        raise TypeError(f"model must be a preset name, a JSON spec path or a spec dict, got {type(model).__name__}")
    spec = get_preset(model)
    spec["preset"] = model
    return spec


def is_latent(spec: dict | None, in_channels: int | None = None) -> bool:
    """Whether samples are VAE latents (not pixels): the spec says so; without a spec, anything but 1 or 3
    channels is taken for latents."""
    if spec is not None and "latent" in spec:
        return bool(spec["latent"])
    return in_channels not in (1, 3)

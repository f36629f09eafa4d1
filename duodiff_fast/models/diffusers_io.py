"""diffusers-format DiT weights: read a `DiTTransformer2DModel` folder into our DiT, and export ours to one.

Needs no diffusers install: a diffusers model folder is `config.json` plus safetensors (or torch `.bin`)
weights, sharded or not, and both are read and written here with json and safetensors.

Key map (diffusers -> ours), strict both ways (a missing or extra key is an error naming it):

    pos_embed.proj.*                                  x_embedder.proj.*
    transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}.*   t_embedder.mlp.{0,2}.*
    transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight   y_embedder.embedding_table.weight
    transformer_blocks.{i}.norm1.linear.*             blocks.{i}.adaLN_modulation.1.*
    transformer_blocks.{i}.attn1.to_{q,k,v}.*         blocks.{i}.attn.qkv.*  (q, k, v stacked on dim 0)
    transformer_blocks.{i}.attn1.to_out.0.*           blocks.{i}.attn.proj.*
    transformer_blocks.{i}.ff.net.0.proj.*            blocks.{i}.mlp.fc1.*
    transformer_blocks.{i}.ff.net.2.*                 blocks.{i}.mlp.fc2.*
    proj_out_1.*                                      final_layer.adaLN_modulation.1.*
    proj_out_2.*                                      final_layer.linear.*

diffusers keeps one copy of the time/label embedder in every block (the output layer uses block 0's);
the original DiT has one shared embedder. Reading requires every copy to equal block 0's (true of
every converted DiT); export writes the shared one into every block. diffusers does not store the fixed
position embedding (it recomputes it, MAE order: first half of the channels encodes the column).

Numerics: diffusers' DiT differs from the original DiT in two places, whatever the weights:
- the sinusoidal time embedding uses frequencies exp(-ln(1e4) i / (half - 1)) (`downscale_freq_shift=1`)
  where the original uses i / half: at t=999 the 256-d embeddings differ by up to 1.9 per component;
- the LayerNorm before each MLP uses `config.norm_eps` (1e-5 by default) instead of 1e-6.
A model loaded from a diffusers folder follows diffusers' numerics (`model.numerics`), so it computes
what `DiTPipeline` computes, and its convention for guidance (`model.cfg_channels = None`: DiTPipeline
guides all latent channels, the original DiT's forward_with_cfg 3); `save_safetensors` records both and
`load_checkpoint` restores them. A model trained here follows the original DiT; exported to diffusers,
diffusers evaluates it with its own time embedding (there is no config switch for it), which
`export_diffusers` warns about.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import torch


from .._io import read_json_object
from .checkpoint import CheckpointError, _build, _read, check_state_dict, unwrap_state_dict
from .dit import DiT, TimestepEmbedder

__all__ = [
    "ORIGINAL_NUMERICS",
    "NumericsWarning",
    "apply_numerics",
    "diffusers_config",
    "diffusers_pos_embed",
    "diffusers_to_dit_keys",
    "dit_kwargs_from_config",
    "dit_to_diffusers_state_dict",
    "export_diffusers",
    "find_model_folder",
    "get_numerics",
    "load_diffusers_dit",
    "read_config",
    "read_dit_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
FOLDER_EXPECTED = ("a diffusers DiTTransformer2DModel folder: config.json and "
                   "diffusion_pytorch_model.safetensors (or a .safetensors.index.json with its shards)")
# DiTTransformer2DModel's constructor defaults (diffusers 0.42), for configs that leave keys out.
_DIFFUSERS_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                           num_layers=28, dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32,
                           patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                           upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                           norm_eps=1e-5)
ORIGINAL_NUMERICS = dict(time_freq_shift=0, mlp_norm_eps=1e-6)


class NumericsWarning(UserWarning):
    """An exported model will not compute exactly the same function in diffusers."""


# -----------------------------------------------------------------------------
# Numerics: diffusers' time embedding and MLP LayerNorm eps on our DiT
# -----------------------------------------------------------------------------

def shifted_timestep_embedding(t: torch.Tensor, dim: int, shift: int = 1, max_period: float = 10000.0):
    """diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=shift)`:
    (N,) -> (N, dim) float32 [cos, sin], frequencies exp(-ln(max_period) i / (half - shift))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ShiftedTimestepEmbedder(TimestepEmbedder):
    """TimestepEmbedder with diffusers' frequency spacing (same parameters)."""
    freq_shift = 1

    def forward(self, t):
        t_freq = shifted_timestep_embedding(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def get_numerics(model) -> dict:
    """{'time_freq_shift': 0 | 1, 'mlp_norm_eps': float} of a DiT (the original DiT's unless set)."""
    return dict(getattr(model, "numerics", None) or ORIGINAL_NUMERICS)


def apply_numerics(model, numerics: dict):
    """Make a DiT compute with `numerics` ({'time_freq_shift': 0|1, 'mlp_norm_eps': eps}; values may be
    strings, as stored in safetensors metadata), in place; returns the model. Parameters are untouched."""
    if not isinstance(model, DiT):
        raise CheckpointError(f"time_freq_shift/mlp_norm_eps numerics apply to DiT models only, got "
                              f"{type(model).__name__}")
    shift = int(numerics.get("time_freq_shift", 0))
    eps = float(numerics.get("mlp_norm_eps", ORIGINAL_NUMERICS["mlp_norm_eps"]))
    if shift not in (0, 1):
        raise CheckpointError(f"time_freq_shift must be 0 (original DiT) or 1 (diffusers), got {shift}")
    if not (eps > 0 and math.isfinite(eps)):
        raise CheckpointError(f"mlp_norm_eps must be a positive number, got {eps}")
    # Same parameters, other forward: switching the class keeps every tensor (and the state_dict) as is.
    model.t_embedder.__class__ = ShiftedTimestepEmbedder if shift == 1 else TimestepEmbedder
    for blk in model.blocks:
        blk.norm2.eps = eps  # DiTBlock's fused path reads norm2.eps, as its torch path does
    if shift == ORIGINAL_NUMERICS["time_freq_shift"] and eps == ORIGINAL_NUMERICS["mlp_norm_eps"]:
        model.numerics = None
    else:
        model.numerics = dict(time_freq_shift=shift, mlp_norm_eps=eps)
    return model


# -----------------------------------------------------------------------------
# Position embedding
# -----------------------------------------------------------------------------

def diffusers_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos embedding diffusers' PatchEmbed recomputes (MAE order: the first half of the
    channels encodes the column, the second the row; each half [sin, cos]): (1, grid*grid, dim) float32.
    The same table our DiT builds (`dit.get_2d_sincos_pos_embed`)."""
    from .dit import get_2d_sincos_pos_embed
    return get_2d_sincos_pos_embed(dim, grid).float().unsqueeze(0)


def _half_swap(dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(dim // 2, dim), torch.arange(0, dim // 2)])


# -----------------------------------------------------------------------------
# Folders and configs
# -----------------------------------------------------------------------------

def _is_diffusers_config(path) -> bool:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return os.path.isfile(path)  # unreadable config.json: let read_config say what is wrong
    return isinstance(cfg, dict) and "_class_name" in cfg


def find_model_folder(path):
    """The diffusers model folder at `path` (a folder with a diffusers config.json, or a pipeline folder
    with `transformer/`), or None when `path` is not one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if _is_diffusers_config(os.path.join(path, CONFIG_NAME)):
        return path
    sub = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(sub):
        return sub
    return None


def read_config(folder) -> dict:
    """config.json of a diffusers model folder, checked to describe a DiT transformer."""
    path = os.path.join(os.fspath(folder), CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot load diffusers folder {folder}: no {CONFIG_NAME}; expected {FOLDER_EXPECTED}")
    cfg = read_json_object(path, f"the config of a diffusers folder ({FOLDER_EXPECTED})", CheckpointError)
    name = cfg.get("_class_name")
    if name not in DIT_CLASS_NAMES or cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise CheckpointError(f"cannot load diffusers folder {folder}: its config describes _class_name={name!r}"
                              f" (norm_type={cfg.get('norm_type')!r}); expected a DiT transformer "
                              f"(_class_name in {DIT_CLASS_NAMES}, norm_type 'ada_norm_zero')")
    return cfg


def dit_kwargs_from_config(cfg: dict, where="diffusers config"):
    """(DiT constructor kwargs, numerics) for a DiTTransformer2DModel config; refuses configs our DiT
    cannot express."""
    c = dict(_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    problems = []
    if c["activation_fn"] != "gelu-approximate":
        problems.append(f"activation_fn={c['activation_fn']!r} (DiT uses 'gelu-approximate')")
    if c["norm_elementwise_affine"]:
        problems.append("norm_elementwise_affine=True (DiT's LayerNorms have no affine parameters)")
    if not c["attention_bias"]:
        problems.append("attention_bias=False (DiT's qkv has a bias)")
    if c["patch_size"] is None or c["num_embeds_ada_norm"] is None:
        problems.append("patch_size and num_embeds_ada_norm must be set for a class-conditional DiT")
    in_ch = c["in_channels"]
    out_ch = c["out_channels"] if c["out_channels"] is not None else in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(f"out_channels={out_ch} (expected in_channels={in_ch}, or {2 * in_ch} with learned sigma)")
    if problems:
        raise CheckpointError(f"{where}: a DiTTransformer2DModel our DiT cannot represent: " + "; ".join(problems))
    kwargs = dict(input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=in_ch,
                  hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
                  num_heads=c["num_attention_heads"], mlp_ratio=4.0, class_dropout_prob=0.1,
                  num_classes=c["num_embeds_ada_norm"], learn_sigma=out_ch == 2 * in_ch)
    numerics = dict(time_freq_shift=1, mlp_norm_eps=float(c["norm_eps"]))
    return kwargs, numerics


def _model_arch(model) -> dict:
    hidden = model.hidden_size
    return dict(input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
                hidden_size=hidden, depth=len(model.blocks), num_heads=model.num_heads,
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / hidden if len(model.blocks) else 4.0,
                num_classes=model.num_classes, learn_sigma=model.learn_sigma,
                null_row=model.y_embedder.embedding_table.num_embeddings > model.num_classes)


_CONFIG_NAMES = dict(input_size="sample_size", patch_size="patch_size", in_channels="in_channels",
                     hidden_size="num_attention_heads * attention_head_dim", depth="num_layers",
                     num_heads="num_attention_heads", num_classes="num_embeds_ada_norm",
                     learn_sigma="out_channels == 2 * in_channels", mlp_ratio="feed-forward ratio (always 4)",
                     null_row="null-class row (diffusers always has one)")


def check_config_against_model(cfg: dict, model, name: str, folder):
    """Raise CheckpointError naming every config entry that disagrees with the model built from `name`."""
    if not isinstance(model, DiT):
        raise CheckpointError(f"diffusers folder {folder} holds a DiT transformer, but preset {name!r} builds a "
                              f"{type(model).__name__}; use a DiT preset (dit_*)")
    kwargs, _ = dit_kwargs_from_config(cfg, where=f"diffusers folder {folder}")
    want = dict(kwargs, null_row=True)
    have = _model_arch(model)
    diffs = [f"{_CONFIG_NAMES[k]}: folder {want[k]!r} vs preset {have[k]!r}" for k in _CONFIG_NAMES
             if want[k] != have[k]]
    if diffs:
        raise CheckpointError(f"diffusers folder {folder} does not match preset {name!r}: " + "; ".join(diffs))


# -----------------------------------------------------------------------------
# Weights
# -----------------------------------------------------------------------------

def _weight_files(folder):
    """The weight files of a model folder, in a fixed order (one file or the shards of an index)."""
    for name in WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)], None
    for name in INDEX_NAMES:
        index_path = os.path.join(folder, name)
        if not os.path.isfile(index_path):
            continue
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not an object of file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot load diffusers folder {folder}: {index_path} is not a valid shard "
                                  f"index ({type(e).__name__}: {e}); expected JSON with a 'weight_map' of "
                                  "key -> shard file") from e
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if absent:
            raise CheckpointError(f"cannot load diffusers folder {folder}: {name} lists shard(s) that are not "
                                  f"there: {', '.join(absent[:5])}")
        return [os.path.join(folder, s) for s in shards], weight_map
    variants = sorted(f for f in os.listdir(folder)
                      if f.startswith("diffusion_pytorch_model.") and f.endswith(".safetensors"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors, the folder's only weights
        return [os.path.join(folder, variants[0])], None
    listing = ", ".join(sorted(os.listdir(folder))[:10]) or "nothing"
    raise CheckpointError(f"cannot load diffusers folder {folder}: no weights found (it holds {listing}); "
                          f"expected {FOLDER_EXPECTED}")


def read_diffusers_weights(folder, map_location="cpu") -> dict:
    """All tensors of a diffusers model folder (merged shards), diffusers key names."""
    files, weight_map = _weight_files(folder)
    out, origin = {}, {}
    for path in files:
        sd = unwrap_state_dict(_read(path, map_location), source=path)
        for k, v in sd.items():
            if k in out:
                raise CheckpointError(f"cannot load diffusers folder {folder}: key {k} is in both "
                                      f"{os.path.basename(origin[k])} and {os.path.basename(path)}")
            out[k], origin[k] = v, path
    if weight_map is not None:
        wrong = [k for k, f in weight_map.items() if os.path.join(folder, f) != origin.get(k)]
        if wrong:
            k = wrong[0]
            where = os.path.basename(origin[k]) if k in origin else "no shard"
            raise CheckpointError(f"cannot load diffusers folder {folder}: the shard index puts {len(wrong)} "
                                  f"key(s) where they are not, e.g. {k} (index: {weight_map[k]}, found in "
                                  f"{where})")
    return out


def _block_map(i):
    d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
    return {d + "norm1.linear.weight": o + "adaLN_modulation.1.weight",
            d + "norm1.linear.bias": o + "adaLN_modulation.1.bias",
            d + "attn1.to_out.0.weight": o + "attn.proj.weight",
            d + "attn1.to_out.0.bias": o + "attn.proj.bias",
            d + "ff.net.0.proj.weight": o + "mlp.fc1.weight",
            d + "ff.net.0.proj.bias": o + "mlp.fc1.bias",
            d + "ff.net.2.weight": o + "mlp.fc2.weight",
            d + "ff.net.2.bias": o + "mlp.fc2.bias"}


_EMB = {"norm1.emb.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "norm1.emb.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "norm1.emb.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "norm1.emb.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "norm1.emb.class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight"}
_TOP = {"pos_embed.proj.weight": "x_embedder.proj.weight", "pos_embed.proj.bias": "x_embedder.proj.bias",
        "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight",
        "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
        "proj_out_2.weight": "final_layer.linear.weight", "proj_out_2.bias": "final_layer.linear.bias"}
_QKV = ("to_q", "to_k", "to_v")


def expected_diffusers_keys(depth: int) -> list:
    keys = list(_TOP)
    for i in range(depth):
        keys += [f"transformer_blocks.{i}.{k}" for k in _EMB]
        keys += list(_block_map(i))
        keys += [f"transformer_blocks.{i}.attn1.{p}.{w}" for p in _QKV for w in ("weight", "bias")]
    return keys


def diffusers_to_dit_keys(dsd: dict, depth: int, hidden_size: int, grid: int, source="diffusers weights") -> dict:
    """Our DiT's state dict from a DiTTransformer2DModel's (strict: missing or extra keys raise)."""
    expected = expected_diffusers_keys(depth)
    missing = [k for k in expected if k not in dsd]
    extra = sorted(set(dsd) - set(expected))
    if missing or extra:
        lines = [f"{source} does not hold a {depth}-block DiTTransformer2DModel:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if extra:
            lines.append(f"  {len(extra)} unexpected keys: " + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        raise CheckpointError("\n".join(lines))
    sd = {ours: dsd[theirs] for theirs, ours in _TOP.items()}
    for suffix, ours in _EMB.items():
        first = dsd[f"transformer_blocks.0.{suffix}"]
        for i in range(1, depth):
            key = f"transformer_blocks.{i}.{suffix}"
            if dsd[key].shape != first.shape or not torch.equal(dsd[key], first):
                raise CheckpointError(
                    f"{source}: {key} differs from block 0's copy. Our DiT (like the original) has one shared "
                    "time/label embedder; this model has one per block, which it cannot represent")
        sd[ours] = first
    for i in range(depth):
        for theirs, ours in _block_map(i).items():
            sd[ours] = dsd[theirs]
        for w in ("weight", "bias"):
            parts = [dsd[f"transformer_blocks.{i}.attn1.{p}.{w}"] for p in _QKV]
            if len({tuple(p.shape) for p in parts}) != 1:
                raise CheckpointError(f"{source}: transformer_blocks.{i}.attn1.to_q/k/v.{w} differ in shape "
                                      f"({[list(p.shape) for p in parts]})")
            sd[f"blocks.{i}.attn.qkv.{w}"] = torch.cat(parts, dim=0)
    sd["pos_embed"] = diffusers_pos_embed(hidden_size, grid)
    return sd


def read_dit_state_dict(folder, map_location="cpu", model=None, name="model") -> dict:
    """Our DiT's state dict from a diffusers model folder; with `model`, the folder's config is checked
    against it first."""
    cfg = read_config(folder)
    if model is not None:
        check_config_against_model(cfg, model, name, folder)
    kwargs, _ = dit_kwargs_from_config(cfg, where=f"diffusers folder {folder}")
    dsd = read_diffusers_weights(folder, map_location)
    return diffusers_to_dit_keys(dsd, kwargs["depth"], kwargs["hidden_size"],
                                 kwargs["input_size"] // kwargs["patch_size"], source=f"diffusers folder {folder}")


def load_diffusers_dit(folder, preset=None, map_location="cpu", strict=True):
    """Our DiT with the weights of a diffusers DiTTransformer2DModel folder, computing what diffusers'
    forward computes (its numerics, see the module docstring). `preset` (name, dict or DiT module) is
    checked against the folder's config; None builds the DiT from the config (linear schedule, T=1000,
    integer time: DiT's). Returns the model in eval mode."""
    from .configs import LATENT_SCALE, LINEAR, create_model
    folder = os.fspath(folder)
    cfg = read_config(folder)
    kwargs, numerics = dit_kwargs_from_config(cfg, where=f"diffusers folder {folder}")
    if preset is None:
        spec = dict(family="dit", kwargs=kwargs, time_convention="int", schedule=dict(LINEAR), latent=True,
                    latent_scale=LATENT_SCALE, description=f"DiT from diffusers folder {folder}")
        model, name = create_model(spec), spec["description"]
    else:
        model, name = _build(preset)
    check_config_against_model(cfg, model, name, folder)
    dsd = read_diffusers_weights(folder, map_location)
    sd = diffusers_to_dit_keys(dsd, kwargs["depth"], kwargs["hidden_size"],
                               kwargs["input_size"] // kwargs["patch_size"], source=f"diffusers folder {folder}")
    check_state_dict(model, sd, name, strict, source=folder)
    model.load_state_dict(sd, strict=strict)
    apply_numerics(model, numerics)
    # diffusers' DiTPipeline guides every latent channel (the original DiT's forward_with_cfg guides 3):
    # a model in diffusers' format follows its pipeline's convention.
    model.cfg_channels = None
    return model.eval()


# -----------------------------------------------------------------------------
# Export
# -----------------------------------------------------------------------------

def _permute_hidden(sd: dict, perm: torch.Tensor, depth: int) -> dict:
    """Relabel the residual-stream channels of a DiT state dict by `perm` (new channel j = old perm[j]).
    LayerNorms without affine parameters are invariant to it, the conditioning vector c is not in the
    residual stream, so the permuted model computes the same function with a permuted pos_embed."""
    sd = dict(sd)
    C = perm.numel()

    def rows(t, chunks=1):  # output channels in the residual stream, per chunk of C
        return torch.cat([c[perm] for c in t.split(C, dim=0)], dim=0) if chunks > 1 else t[perm]

    sd["pos_embed"] = sd["pos_embed"][..., perm]
    sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][perm]
    sd["x_embedder.proj.bias"] = sd["x_embedder.proj.bias"][perm]
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "adaLN_modulation.1.weight"] = rows(sd[b + "adaLN_modulation.1.weight"], 6)
        sd[b + "adaLN_modulation.1.bias"] = rows(sd[b + "adaLN_modulation.1.bias"], 6)
        sd[b + "attn.qkv.weight"] = sd[b + "attn.qkv.weight"][:, perm]
        sd[b + "attn.proj.weight"] = sd[b + "attn.proj.weight"][perm]
        sd[b + "attn.proj.bias"] = sd[b + "attn.proj.bias"][perm]
        sd[b + "mlp.fc1.weight"] = sd[b + "mlp.fc1.weight"][:, perm]
        sd[b + "mlp.fc2.weight"] = sd[b + "mlp.fc2.weight"][perm]
        sd[b + "mlp.fc2.bias"] = sd[b + "mlp.fc2.bias"][perm]
    sd["final_layer.adaLN_modulation.1.weight"] = rows(sd["final_layer.adaLN_modulation.1.weight"], 2)
    sd["final_layer.adaLN_modulation.1.bias"] = rows(sd["final_layer.adaLN_modulation.1.bias"], 2)
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:, perm]
    return sd


def _check_exportable(model):
    if not isinstance(model, DiT):
        raise CheckpointError(f"export --format diffusers needs a DiT model; {type(model).__name__} has no "
                              "diffusers model class (use --format safetensors)")
    arch = _model_arch(model)
    if not arch["null_row"]:
        raise CheckpointError("export --format diffusers: this DiT has no null-class row (class_dropout_prob=0), "
                              "while diffusers' DiTTransformer2DModel always has one")
    if arch["mlp_ratio"] != 4.0:
        raise CheckpointError(f"export --format diffusers: mlp_ratio {arch['mlp_ratio']:g} is not expressible "
                              "(diffusers' DiT feed-forward is 4x wide)")
    if model.num_classes <= 0:
        raise CheckpointError("export --format diffusers: diffusers' DiT is class-conditional; this model has "
                              "num_classes=0")


def diffusers_config(model) -> dict:
    """config.json for a DiTTransformer2DModel equivalent to `model`."""
    _check_exportable(model)
    numerics = get_numerics(model)
    cfg = {"_class_name": "DiTTransformer2DModel"}
    try:
        import diffusers
        cfg["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    cfg.update(num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
               in_channels=model.in_channels, out_channels=model.out_channels, num_layers=len(model.blocks),
               dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=model.input_size,
               patch_size=model.patch_size, activation_fn="gelu-approximate", num_embeds_ada_norm=model.num_classes,
               upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
               norm_eps=float(numerics["mlp_norm_eps"]))
    return cfg


def dit_to_diffusers_state_dict(model) -> dict:
    """A DiTTransformer2DModel state dict (contiguous CPU tensors, no shared storage) for `model`."""
    _check_exportable(model)
    depth, C = len(model.blocks), model.hidden_size
    grid = model.input_size // model.patch_size
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    target = diffusers_pos_embed(C, grid)
    pos = sd["pos_embed"].float()
    if not torch.allclose(pos, target, rtol=0, atol=1e-6):
        perm = _half_swap(C)
        if torch.allclose(pos[..., perm], target, rtol=0, atol=1e-6):
            sd = _permute_hidden(sd, perm, depth)  # row-first sin-cos table: relabel channels, exactly
        else:
            err = (pos - target).abs().max().item()
            raise CheckpointError(f"export --format diffusers: the model's pos_embed is not the fixed sin-cos "
                                  f"table diffusers recomputes (max difference {err:.3g}, with the row/column "
                                  "halves swapped too); diffusers does not store pos_embed, so the export "
                                  "would change the model")
    out = {}
    for theirs, ours in _TOP.items():
        out[theirs] = sd[ours]
    for i in range(depth):
        for suffix, ours in _EMB.items():
            out[f"transformer_blocks.{i}.{suffix}"] = sd[ours]
        for theirs, ours in _block_map(i).items():
            out[theirs] = sd[ours]
        for w in ("weight", "bias"):
            for p, part in zip(_QKV, sd[f"blocks.{i}.attn.qkv.{w}"].chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{i}.attn1.{p}.{w}"] = part
    # safetensors refuses tensors that share memory (the embedder copies, the q/k/v views).
    return {k: v.clone().contiguous() for k, v in out.items()}


def export_diffusers(model, out_dir, *, overwrite=False, dtype=None) -> str:
    """Write `model` (a DiT) as a diffusers DiTTransformer2DModel folder at `out_dir`: config.json and
    diffusion_pytorch_model.safetensors, loadable with `DiTTransformer2DModel.from_pretrained(out_dir)`
    and by `load_checkpoint(out_dir, preset)`. Written under a temporary name and renamed, so an existing
    folder is replaced only when `overwrite` and only once the new one is complete. Warns
    (NumericsWarning) when diffusers will evaluate the model with a different time embedding."""
    from safetensors.torch import save_file
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"export: --out {out_dir} is a file; expected a folder path for --format diffusers")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"export: {out_dir} exists and is not empty; pass overwrite=True (--overwrite) to "
                              "replace it")
    cfg = diffusers_config(model)
    sd = dit_to_diffusers_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if get_numerics(model)["time_freq_shift"] != 1:
        warnings.warn(
            "diffusers' DiTTransformer2DModel embeds timesteps with frequencies exp(-ln(1e4) i/127) where the "
            "original DiT, and this model, use i/128 (diffusers has no setting for it); in diffusers the "
            "exported model therefore computes a different function from this one. Models loaded from a "
            "diffusers folder follow diffusers' embedding and export exactly.", NumericsWarning, stacklevel=2)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.{os.getpid()}.tmp")
    old = os.path.join(parent, f".{os.path.basename(out_dir)}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_file(sd, os.path.join(tmp, WEIGHTS_NAMES[0]), metadata={"format": "pt"})
        if os.path.isdir(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def is_exact_in_diffusers(model) -> bool:
    """Whether diffusers computes the same function as `model` after `export_diffusers`."""
    return get_numerics(model)["time_freq_shift"] == 1

"""Make the golden tensors that tests/test_models.py checks our U-ViT and DiT against.

Runs the OFFICIAL model code (U-ViT `libs/uvit.py`, DiT `models.py`) taken with `git show` from local
mirrors of the two upstream repositories, on small configurations that exercise every code path, with
every parameter (zero-initialised ones included) set to random values, in float32. Writes:
  tests/fixtures/uvit_<case>.pt, dit_<case>.pt   config, state_dict, inputs, outputs
  tests/fixtures/official_keys.json               official kwargs + state_dict (key, shape) of every
                                                  full preset and its 3-block companion
  tests/fixtures/guidance.pt                      one guided eps per family, as each official sampler
                                                  guides (`--only guidance` writes just this file)
Nothing of the official code is copied into the project; only its outputs are stored.

Requirements beyond the project's: einops (U-ViT) and timm (DiT imports PatchEmbed/Attention/Mlp from
it). timm may live in a throwaway folder (`pip install --no-deps --target /tmp/timm_pkg timm`, then
`--timm-path /tmp/timm_pkg`). timm imports torchvision at import time for things DiT never uses; when
torchvision is absent an import-only stub stands in for it (any attribute is a dummy class).

    python tools/make_golden.py --uvit-repo /work/.mirror/baofff+U-ViT/repo \
        --dit-repo /work/.mirror/facebookresearch+DiT/repo --timm-path /tmp/timm_pkg
"""
import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

UVIT_CONFIGS = ["cifar10_uvit_small", "celeba64_uvit_small", "imagenet64_uvit_mid", "imagenet64_uvit_large",
                "imagenet256_uvit_large", "imagenet256_uvit_huge", "imagenet512_uvit_large",
                "imagenet512_uvit_huge"]
DIT_MODELS = {"xl": "XL", "l": "L", "b": "B", "s": "S"}

# Small configurations covering every code path. U-ViT: with/without classes, mlp_time_embed on/off,
# conv on/off, skip on/off, qkv_bias on/off, odd and even depth. DiT: learn_sigma on/off, class
# dropout > 0 (null embedding row) and = 0, patch 2 and 4.
UVIT_CASES = {
    "uncond": dict(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=5, num_heads=2, mlp_ratio=2,
                   qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True, skip=True),
    "cond_mlp_noconv": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=48, depth=4, num_heads=1,
                            mlp_ratio=2, qkv_bias=True, mlp_time_embed=True, num_classes=11, conv=False,
                            skip=True),
    "cond_noskip": dict(img_size=12, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2,
                        mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=5, conv=True,
                        skip=False),
}
# Head dims 32 and 48 are ones the fast attention kernels take, 16 (cond_noskip) one they refuse, so
# the ops path is checked both through the kernels and through the fallback.
DIT_CASES = {
    "sigma_null": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                       mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True),
    "nosigma": dict(input_size=16, patch_size=4, in_channels=3, hidden_size=48, depth=3, num_heads=1,
                    mlp_ratio=2.0, class_dropout_prob=0.0, num_classes=7, learn_sigma=False),
}


#################################################################################
#                       Importing the official code                             #
#################################################################################

def git_show(repo, path):
    return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_head(repo):
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


class _Dummy(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy(name, (), {})


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Dummy(name, (), {})
        m.__getattr__ = __getattr__
        return m

    def exec_module(self, module):
        pass


class _TorchvisionStub(importlib.abc.MetaPathFinder):
    """Satisfies `import torchvision...` / `from torchvision.x import Y` with dummies; nothing runs them."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def import_official_uvit(repo, tmp):
    pkg = os.path.join(tmp, "uvit_official", "libs")
    os.makedirs(pkg)
    for name in ("__init__.py", "uvit.py", "timm.py"):
        with open(os.path.join(pkg, name), "w") as f:
            f.write(git_show(repo, f"libs/{name}"))
    sys.path.insert(0, os.path.dirname(pkg))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its attention mode at import
        mod = importlib.import_module("libs.uvit")
    assert mod.ATTENTION_MODE == "flash", mod.ATTENTION_MODE
    return mod


def import_official_dit(repo, tmp, timm_path):
    if timm_path:
        sys.path.insert(0, timm_path)
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionStub())
    path = os.path.join(tmp, "dit_official_models.py")
    with open(path, "w") as f:
        f.write(git_show(repo, "models.py"))
    spec = importlib.util.spec_from_file_location("dit_official_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import timm
    return mod, timm.__version__


class _ConfigDict(dict):
    """Stand-in for ml_collections.ConfigDict: enough for the official config files."""

    def __init__(self, initial_dictionary=None):
        super().__init__(initial_dictionary or {})

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v


def official_uvit_config(repo, name):
    """The `config.nnet` dict of configs/<name>.py, without 'name' and the memory-only use_checkpoint."""
    ml = types.ModuleType("ml_collections")
    ml.ConfigDict = _ConfigDict
    sys.modules.setdefault("ml_collections", ml)
    ns = {}
    exec(compile(git_show(repo, f"configs/{name}.py"), f"configs/{name}.py", "exec"), ns)
    nnet = dict(ns["get_config"]().nnet)
    nnet.pop("name")
    nnet.pop("use_checkpoint", None)
    return nnet


#################################################################################
#                                  Fixtures                                     #
#################################################################################

@torch.no_grad()
def randomize(model, gen):
    """Every parameter random, zero-initialised ones included; LayerNorm weights near 1."""
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 1:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "embedding_table" in name or "label_emb" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.dim() > 1 else 16
            p.copy_(torch.randn(p.shape, generator=gen) * min(0.2, 1.5 / fan_in ** 0.5))


def make_uvit_fixtures(off, gen):
    for case, kw in UVIT_CASES.items():
        model = off.UViT(**kw).eval()
        randomize(model, gen)
        B = 3
        x = torch.randn(B, kw["in_chans"], kw["img_size"], kw["img_size"], generator=gen)
        t = torch.rand(B, generator=gen) * 999  # continuous, as the VP-SDE models are called
        y = torch.randint(0, kw["num_classes"], (B,), generator=gen) if kw["num_classes"] > 0 else None
        with torch.no_grad():
            out = model(x, t, y=y)
        save(f"uvit_{case}.pt", dict(family="uvit", config=kw, state_dict=model.state_dict(),
                                     inputs=dict(x=x, t=t, y=y), out=out))


def make_dit_fixtures(off, gen):
    for case, kw in DIT_CASES.items():
        model = off.DiT(**kw).eval()
        randomize(model, gen)
        B = 4
        s = kw["input_size"]
        x = torch.randn(B, kw["in_channels"], s, s, generator=gen)
        t = torch.randint(0, 1000, (B,), generator=gen)
        y = torch.randint(0, kw["num_classes"], (B,), generator=gen)
        null = kw["num_classes"] if kw["class_dropout_prob"] > 0 else 0
        y_cfg = torch.cat([y[: B // 2], torch.full((B // 2,), null)])  # [labels, null labels]
        cfg_scale = 2.5
        with torch.no_grad():
            out = model(x, t, y)
            out_cfg = model.forward_with_cfg(x, t, y_cfg, cfg_scale)
        save(f"dit_{case}.pt", dict(family="dit", config=kw, state_dict=model.state_dict(),
                                    inputs=dict(x=x, t=t, y=y, y_cfg=y_cfg, cfg_scale=cfg_scale),
                                    out=out, out_cfg=out_cfg))


def make_guidance_fixture(uvit_off, dit_off, gen):
    """tests/fixtures/guidance.pt: one guided eps per family, the way each official sampler guides.

    DiT (`sample.py`): `forward_with_cfg` on [x, x] at one timestep for the whole batch, labels then null
    labels, cfg-scale w; it guides the first 3 channels only. U-ViT (`eval_ldm.py` / `eval.py`):
    `cond + s * (cond - uncond)` over every channel, with the null label num_classes - 1 (1000 of 1001).
    """
    out = {}
    kw = DIT_CASES["sigma_null"]
    dit = dit_off.DiT(**kw).eval()
    randomize(dit, gen)
    B, s = 3, kw["input_size"]
    x = torch.randn(B, kw["in_channels"], s, s, generator=gen)
    t = torch.full((2 * B,), 617)  # official sample.py: one timestep for the whole (doubled) batch
    y = torch.randint(0, kw["num_classes"], (B,), generator=gen)
    y_cfg = torch.cat([y, torch.full((B,), kw["num_classes"])])
    w = 3.0
    with torch.no_grad():
        eps_cfg = dit.forward_with_cfg(torch.cat([x, x]), t, y_cfg, w)[:B, : kw["in_channels"]]
    out["dit"] = dict(config=kw, state_dict=dit.state_dict(), x=x, t=617, y=y, cfg_scale=w, eps=eps_cfg)
    kw = UVIT_CASES["cond_mlp_noconv"]
    uvit = uvit_off.UViT(**kw).eval()
    randomize(uvit, gen)
    B, s = 3, kw["img_size"]
    x = torch.randn(B, kw["in_chans"], s, s, generator=gen)
    t = torch.full((B,), 0.37 * 999)
    y = torch.randint(0, kw["num_classes"] - 1, (B,), generator=gen)
    scale = 0.4  # upstream's s; diffusers' w = 1 + s
    with torch.no_grad():
        cond = uvit(x, t, y=y)
        uncond = uvit(x, t, y=torch.full_like(y, kw["num_classes"] - 1))
    out["uvit"] = dict(config=kw, state_dict=uvit.state_dict(), x=x, t=0.37 * 999, y=y, upstream_scale=scale,
                       eps=cond + scale * (cond - uncond))
    save("guidance.pt", out)


def save(name, obj):
    path = os.path.join(FIXTURES, name)
    torch.save(obj, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB)")


def keys_of(model):
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def dit_kwargs(model, input_size):
    """The official DiT_XL_2-style factories fix depth/width/patch/heads: read all kwargs back."""
    hidden = model.pos_embed.shape[-1]
    return dict(input_size=input_size, patch_size=model.patch_size, in_channels=model.in_channels,
                hidden_size=hidden, depth=len(model.blocks), num_heads=model.num_heads,
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / hidden,
                class_dropout_prob=model.y_embedder.dropout_prob, num_classes=model.y_embedder.num_classes,
                learn_sigma=model.learn_sigma)


def make_key_json(uvit_off, dit_off, uvit_repo, dit_repo, timm_version):
    """Official kwargs and (key, shape) lists of every full configuration and its 3-block companion."""
    out = dict(_meta=dict(uvit_commit=git_head(uvit_repo), dit_commit=git_head(dit_repo), timm=timm_version,
                          note="our preset name -> official constructor kwargs and state_dict keys/shapes"))
    entries = {}
    for cfg in UVIT_CONFIGS:
        dataset, _, size = cfg.split("_")
        entries[f"uvit_{dataset}_{size}"] = ("uvit", official_uvit_config(uvit_repo, cfg))
    for size, up in DIT_MODELS.items():
        for p in (2, 4, 8):
            ctor = dit_off.DiT_models[f"DiT-{up}/{p}"]
            entries[f"dit_{size}_{p}"] = ("dit", ctor, dict(input_size=32))
    entries["dit_xl_2_512"] = ("dit", dit_off.DiT_models["DiT-XL/2"], dict(input_size=64))
    for name, entry in entries.items():
        for shallow in (False, True):
            with torch.device("meta"):  # shapes only: full-size models without allocating them
                if entry[0] == "uvit":
                    kw = dict(entry[1], **({"depth": 3} if shallow else {}))
                    model = uvit_off.UViT(**kw)
                else:
                    model = entry[1](**entry[2])
                    kw = dit_kwargs(model, entry[2]["input_size"])
                    if shallow:
                        kw["depth"] = 3
                        model = dit_off.DiT(**kw)
            key = name + ("_shallow" if shallow else "")
            out[key] = dict(family=entry[0], kwargs=kw, keys=keys_of(model))
    path = os.path.join(FIXTURES, "official_keys.json")
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}\n")
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB, {len(out) - 1} presets)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uvit-repo", default="/work/.mirror/baofff+U-ViT/repo")
    ap.add_argument("--dit-repo", default="/work/.mirror/facebookresearch+DiT/repo")
    ap.add_argument("--timm-path", default=None, help="folder holding the timm package, if not installed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["guidance"], default=None,
                    help="write only this fixture (the others keep their bytes)")
    args = ap.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        uvit_off = import_official_uvit(args.uvit_repo, tmp)
        dit_off, timm_version = import_official_dit(args.dit_repo, tmp, args.timm_path)
        if args.only == "guidance":
            make_guidance_fixture(uvit_off, dit_off, torch.Generator().manual_seed(args.seed + 1))
            return
        make_uvit_fixtures(uvit_off, gen)
        make_dit_fixtures(dit_off, gen)
        make_key_json(uvit_off, dit_off, args.uvit_repo, args.dit_repo, timm_version)


if __name__ == "__main__":
    main()

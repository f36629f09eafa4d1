"""Copy a trained DuoDiff pair into the package as the demo weights (fp16, spec in the metadata).

    python tools/export_demo.py --deep runs/demo_deep/ema.safetensors --shallow runs/demo_shallow/ema.safetensors \
        [--exits-adadiff runs/demo_exits_adadiff/exits.safetensors --exits-duodiff ...]

The weights are stored in float16 so the pair fits the 10 MiB the package allows; the demo loads them
back as float32. The exact training commands are tools/rebuild_demo.sh (README, 'Demo weights').
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "duodiff_fast", "assets")
LIMIT = 10 * 2**20


def export(src, dst):
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata() or {})
        if "spec" not in meta:
            raise SystemExit(f"{src}: no 'spec' metadata; expected the ema.safetensors written by `duodiff-fast train`")
        sd = {k: f.get_tensor(k).to(torch.float16).contiguous() for k in f.keys()}
    if not meta.get("data"):  # older exports: the run's config.json next to the file names the dataset
        cfg = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as fh:
                meta["data"] = str(json.load(fh).get("data", ""))
    meta["stored_dtype"] = "float16"
    meta["source"] = os.path.relpath(os.path.abspath(src), ROOT) if src.startswith(ROOT) else os.path.basename(src)
    save_file(sd, dst, metadata=meta)
    return os.path.getsize(dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deep", required=True)
    p.add_argument("--shallow", required=True)
    p.add_argument("--exits-adadiff", default=None, help="exits.safetensors of `train-exits --variant adadiff`")
    p.add_argument("--exits-duodiff", default=None, help="exits.safetensors of `train-exits --variant duodiff`")
    p.add_argument("--out", default=ASSETS)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    total = export(a.deep, os.path.join(a.out, "demo_deep.safetensors"))
    total += export(a.shallow, os.path.join(a.out, "demo_shallow.safetensors"))
    names = ["demo_deep", "demo_shallow"]
    for variant, src in (("adadiff", a.exits_adadiff), ("duodiff", a.exits_duodiff)):
        if src:  # exit heads are small: copied as they are (float32), metadata and all
            dst = os.path.join(a.out, f"demo_exits_{variant}.safetensors")
            shutil.copyfile(src, dst)
            total += os.path.getsize(dst)
            names.append(f"demo_exits_{variant}")
    print(f"wrote {', '.join(names)} (.safetensors) to {a.out}: {total / 2**20:.2f} MiB")
    if total > LIMIT:
        print("over the 10 MiB budget for shipped weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Guidance of the shallow steps on the demo pair: DuoDiff's class accuracy and proxy FID per shallow scale.

Every row samples the same noise and labels (labels 0..9 in turn, DDIM 25, x0 clipped, as the demo) and is
scored as the demo scores its rows (`demo.score_modes`: class accuracy, proxy FID against held-out images of
the pair's training data, paired differences to deep-only). Rows:
- deep-only at `--cfg` (the baseline);
- DuoDiff at each switch and each shallow scale (deep steps at `--cfg`);
- with `--control`: the *deep* model on both segments with the same guidance schedule (scale w for the
  first steps, `--cfg` after), which says how much of a change is the guidance schedule itself and how
  much the companion;
- shallow-only at each scale.

Use noise other than the demo's (`--seed 1`; the demo draws seed 0) to choose a scale, then measure the
choice with `duodiff-fast demo --n 1000`.

    python tools/shallow_cfg_sweep.py --n 500 --seed 1 --scales 3,2.5,2,1.5,1 --switches 0.4,0.6 \\
        --out bench/results/shallow_cfg_sweep_seed1
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from duodiff_fast import _io  # noqa: E402
from duodiff_fast._validate import argtype_float, argtype_int  # noqa: E402


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def run(n=500, seed=1, scales=(3.0, 2.0, 1.0), switches=(0.4,), cfg_scale=3.0, steps=25, control=False,
        shallow_only=True, batch_size=250, reference_n=2000, device=None):
    from tqdm.auto import tqdm

    from duodiff_fast.demo import load_demo_pair, score_modes, timed_samples
    from duodiff_fast.sampling import DuoSampler
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shallow, deep = load_demo_pair(device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, deep.in_channels, deep.img_size, deep.img_size, generator=gen)
    labels = torch.arange(n) % 10
    modes = [("deep-only", shallow, 0.0, None)]
    for s in switches:
        modes += [(f"DuoDiff {s:g}, shallow {w:g}", shallow, s, w) for w in scales]
        if control:
            modes += [(f"deep model, {w:g} for the first {s:g}", deep, s, w) for w in scales if w != cfg_scale]
    if shallow_only:
        modes += [(f"shallow-only {w:g}", shallow, 1.0, w) for w in scales]
    images, rows = {}, []
    for name, first, s, w in tqdm(modes, desc="shallow guidance", unit="mode"):
        smp = DuoSampler(first, deep, schedule=deep.schedule_spec, solver="ddim", steps=steps, switch=s,
                         cfg_scale=cfg_scale, shallow_cfg_scale=w, clip_sample=1.0)
        images[name], sec = timed_samples(smp, noise, labels, batch_size)
        rows.append(dict(mode=name, switch=s, shallow_cfg_scale=smp.shallow_cfg_scale,
                         first_model="deep" if first is deep else "shallow", shallow_steps=smp.k, steps=steps,
                         n=n, seconds_per_image=sec / n, theoretical_speedup=1.0 / smp.compute_fraction()))
    score_modes(images, labels, rows, data=deep.training_data, reference_n=reference_n, seed=seed, device=device)
    meta = dict(n=n, seed=seed, cfg_scale=cfg_scale, steps=steps, solver="ddim", clip_sample=1.0,
                reference=rows[0]["reference"], device=rows[0]["device"], torch=torch.__version__,
                deep_trained_steps=deep.trained_steps, shallow_trained_steps=shallow.trained_steps)
    return rows, meta


def markdown(rows, meta) -> str:
    from duodiff_fast.demo import quality_cells
    lines = [f"Demo pair, {meta['n']} samples, noise seed {meta['seed']}, DDIM {meta['steps']}, deep steps at "
             f"guidance {meta['cfg_scale']:g}, {meta['device']}.", "",
             "| mode | shallow steps | block-count speed-up | class accuracy [95% CI] | accuracy - deep (points) "
             "[95% CI] | proxy FID [95% CI] | proxy FID - deep [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['shallow_steps']}/{r['steps']} | {r['theoretical_speedup']:.2f}x | "
                     f"{quality_cells(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=argtype_int(2), default=500)
    p.add_argument("--seed", type=argtype_int(0), default=1)
    p.add_argument("--scales", type=_floats, default=[3.0, 2.5, 2.0, 1.5, 1.0])
    p.add_argument("--switches", type=_floats, default=[0.4, 0.6])
    p.add_argument("--cfg", type=argtype_float(0.0), default=3.0, help="guidance of the deep steps")
    p.add_argument("--control", action="store_true",
                   help="add the deep model with the same guidance schedule (no companion)")
    p.add_argument("--no-shallow-only", dest="shallow_only", action="store_false")
    p.add_argument("--batch-size", type=argtype_int(1), default=250)
    p.add_argument("--steps", type=argtype_int(1), default=25)
    p.add_argument("--reference-n", type=argtype_int(2), default=2000, help="held-out images for proxy FID")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    a = p.parse_args(argv)
    _io.check_writable_dir(a.out, "--out")
    t0 = time.perf_counter()
    rows, meta = run(a.n, a.seed, a.scales, a.switches, a.cfg, steps=a.steps, control=a.control,
                     shallow_only=a.shallow_only, batch_size=a.batch_size, reference_n=a.reference_n,
                     device=a.device)
    meta["wall_seconds"] = time.perf_counter() - t0
    for r in rows:
        r.pop("class_acc_per_class", None)
    _io.write_json(os.path.join(a.out, "results.json"), dict(meta=meta, rows=rows))
    md = markdown(rows, meta)
    _io.write_text(os.path.join(a.out, "results.md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

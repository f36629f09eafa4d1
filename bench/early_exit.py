"""DuoDiff against early exit at the same speed-up, on the shipped demo pair and its shipped exit heads.

    python bench/early_exit.py                       # writes bench/results/early_exit_<date>_<device>.{json,md,png}
    python bench/early_exit.py --n 200 --thresholds 0.9,0.8,0.7 --variant adadiff --out /tmp/ee

The comparison DuoDiff (arXiv 2410.09633) makes: from the same noise and labels, deep-only, DuoDiff at
several switch points, shallow-only, and early exit (`EarlyExitSampler`, batch mode: the blocks after the
exit are really not run, so the wall clock falls with the exit layer) at several thresholds. Per mode:
measured speed-up over deep-only (every mode sampled at the same batch size), the speed-up the block count
predicts, class accuracy of the shipped proxy classifier and proxy FID against held-out training images,
both with 95% bootstrap intervals, the paired intervals of the accuracy and FID differences to deep-only,
PSNR to deep-only. One plot, quality against measured speed-up, both methods on it.

`--batch-size` matters for early exit: in batch mode the batch leaves at the first exit where every sample
is confident, so the bigger the batch, the later it leaves. The default, 10, is a small serving batch.
Timings are on whatever device runs it (named in the files); CPU timings are CPU timings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from duodiff_fast import _io  # noqa: E402
from duodiff_fast._validate import argtype_float, argtype_int  # noqa: E402


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def run(n=200, steps=25, switches=(0.2, 0.4, 0.6), thresholds=None, variant="adadiff", batch_size=10, seed=0,
        reference_n=2000, cfg_scale=None, solver="ddim", device=None, progress=True, shallow_cfg_scale=None):
    from tqdm.auto import tqdm

    from duodiff_fast.demo import load_demo_pair, score_modes, timed_samples
    from duodiff_fast.profile import _demo_exit_path
    from duodiff_fast.sampling import DuoSampler, EarlyExitSampler
    from duodiff_fast.train_exits import load_exit_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shallow, deep = load_demo_pair(device)
    exit_model = load_exit_model(deep, _demo_exit_path(variant))
    if thresholds is None:
        thresholds = (0.9, 0.8, 0.7, 0.6) if variant == "adadiff" else (0.05, 0.1, 0.2, 0.3)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, deep.in_channels, deep.img_size, deep.img_size, generator=gen)
    common = dict(schedule=deep.schedule_spec, solver=solver, steps=steps, cfg_scale=cfg_scale,
                  clip_sample=1.0 if solver != "dpmsolver++" else None)
    warm = DuoSampler(shallow, deep, switch=0.0, **common)
    labels = torch.arange(n) % warm.label_range()
    warm.sample(noise=noise[:2], y=labels[:2])  # warm-up outside the clock

    modes = [("deep-only", "duodiff", 0.0)] + [(f"DuoDiff {s:g}", "duodiff", float(s)) for s in switches] + \
        [("shallow-only", "duodiff", 1.0)] + [(f"{variant} exit {t:g}", "early-exit", float(t)) for t in thresholds]
    images, rows = {}, []
    for name, method, knob in tqdm(modes, desc="early-exit comparison", unit="mode", disable=not progress):
        if method == "duodiff":
            smp = DuoSampler(shallow, deep, switch=knob, shallow_cfg_scale=shallow_cfg_scale, **common)
            images[name], sec = timed_samples(smp, noise, labels, batch_size)
            theory = 1.0 / smp.compute_fraction()
            blocks = None
        else:
            smp = EarlyExitSampler(exit_model, knob, mode="batch", **common)
            used = []  # blocks run per step, one mean per batch
            images[name], sec = timed_samples(smp, noise, labels, batch_size,
                                              lambda s: used.append(s.trace.exits.double().mean().item()))
            blocks = sum(used) / len(used)
            theory = exit_model.num_blocks / blocks
        rows.append(dict(mode=name, method="DuoDiff" if method == "duodiff" else f"early exit ({variant})",
                         knob=knob, steps=steps, n=n, batch_size=batch_size, seconds_per_image=sec / n,
                         theoretical_speedup=theory, mean_blocks_per_step=blocks))
    data = getattr(deep, "training_data", None) or "shapes"
    score_modes(images, labels, rows, data=data, reference_n=reference_n, seed=seed, device=device)
    meta = dict(n=n, steps=steps, solver=solver, cfg_scale=cfg_scale, shallow_cfg_scale=shallow_cfg_scale,
                seed=seed, batch_size=batch_size,
                variant=variant, depth=exit_model.num_blocks, device=rows[0]["device"],
                deep_trained_steps=deep.trained_steps, shallow_trained_steps=shallow.trained_steps,
                torch=torch.__version__, date=datetime.date.today().isoformat())
    return rows, images, meta


def markdown(rows, meta) -> str:
    from duodiff_fast.demo import quality_cells
    lines = [f"Demo pair, {meta['n']} samples (labels 0..9 in turn), {meta['solver'].upper()} {meta['steps']} steps, "
             f"guidance {meta['cfg_scale'] or 'none'}"
             + (f" (shallow steps {meta['shallow_cfg_scale']:g})" if meta.get("shallow_cfg_scale") is not None else "")
             + f", batch {meta['batch_size']}, {meta['device']}; early exit: "
             f"{meta['variant']} heads, batch mode.", "",
             "| mode | method | measured speed-up | block-count speed-up | class accuracy [95% CI] | "
             "accuracy - deep (points) [95% CI] | proxy FID [95% CI] | FID - deep [95% CI] | PSNR vs deep (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "-" if r["mode"] == "deep-only" else f"{r['psnr_vs_deep']:.1f}"
        lines.append(f"| {r['mode']} | {r['method']} | {r['speedup']:.2f}x | {r['theoretical_speedup']:.2f}x | "
                     f"{quality_cells(r)} | {psnr} |")
    return "\n".join(lines)


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = {}
    for r in rows:
        key = "DuoDiff (switch)" if r["method"] == "DuoDiff" else f"early exit, {meta['variant']} (threshold)"
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["speedup"])
        sp = [r["speedup"] for r in rs]
        for ax, k, scale in ((axes[0], "class_acc", 100.0), (axes[1], "proxy_fid", 1.0)):
            y = [scale * r[k] for r in rs]
            err = [[scale * max(0.0, r[k] - r[f"{k}_low"]) for r in rs],  # FID's interval can sit above it
                   [scale * max(0.0, r[f"{k}_high"] - r[k]) for r in rs]]
            ax.errorbar(sp, y, yerr=err, fmt="o-", capsize=3, label=key)
            for r, v in zip(rs, y):
                ax.annotate(r["mode"].replace("DuoDiff ", "s=").replace(f"{meta['variant']} exit ", "t="),
                            (r["speedup"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[2].plot(sp, [r["psnr_vs_deep"] if r["mode"] != "deep-only" else float("nan") for r in rs], "o-",
                     label=key)
    axes[0].set_ylabel("class accuracy (%) [95% CI]")
    axes[1].set_ylabel("proxy FID (lower is better) [95% CI]")
    axes[2].set_ylabel("PSNR vs deep-only, same noise (dB)")
    for ax in axes:
        ax.set_xlabel("measured speed-up over deep-only")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DuoDiff vs early exit on the demo pair: {meta['solver'].upper()} {meta['steps']} steps, batch "
                 f"{meta['batch_size']}, {meta['device']}", fontsize=9)
    fig.tight_layout()
    _io.savefig(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=argtype_int(2), default=200)
    p.add_argument("--steps", type=argtype_int(1), default=25)
    p.add_argument("--switches", type=_floats, default=[0.2, 0.4, 0.6])
    p.add_argument("--thresholds", type=_floats, default=None,
                   help="early-exit thresholds (adadiff: confidence >= t exits; duodiff: uncertainty <= t)")
    p.add_argument("--variant", default="adadiff", choices=["adadiff", "duodiff"])
    p.add_argument("--batch-size", type=argtype_int(1), default=10)
    p.add_argument("--cfg", type=argtype_float(0.0), default=None)
    p.add_argument("--shallow-cfg", type=argtype_float(0.0), default=None,
                   help="guidance of the DuoDiff rows' shallow steps (default: --cfg)")
    p.add_argument("--solver", default="ddim", choices=["ddim", "ddpm", "dpmsolver++"])
    p.add_argument("--reference-n", type=argtype_int(2), default=2000)
    p.add_argument("--seed", type=argtype_int(0), default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args(argv)
    _io.check_writable_dir(a.out, "--out")
    rows, images, meta = run(a.n, a.steps, a.switches, a.thresholds, a.variant, a.batch_size, a.seed,
                             a.reference_n, a.cfg, a.solver, a.device, shallow_cfg_scale=a.shallow_cfg)
    tag = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")[:40]
    stem = os.path.join(a.out, f"early_exit_{meta['date']}_{a.variant}_{tag}")
    _io.write_json(stem + ".json", dict(meta=meta, rows=rows))
    md = markdown(rows, meta)
    _io.write_text(stem + ".md", md + "\n")
    plot(rows, meta, stem + ".png")
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

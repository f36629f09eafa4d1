"""`duodiff-fast demo`: the DuoDiff idea end to end on a laptop, from the pair shipped in the package.

Samples the built-in Shapes data with the deep model alone, with DuoDiff at several switch points and
with the shallow model alone, all from the same noise and labels; then reports speed-up, fidelity to
deep-only (PSNR) and proxy FID, writes a side-by-side grid and a speed/quality plot.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import _io
from ._validate import argtype_float, argtype_int, check_float, check_int

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_FILES = {"deep": "demo_deep.safetensors", "shallow": "demo_shallow.safetensors"}
# Classifier-free guidance of the demo (diffusers' convention: 1 = none). Measured on the first, 4,000-step
# sitting of the shipped deep model (50 samples, DDIM 25): class accuracy 18% without guidance, 38% at 3,
# 36% at 5 (README, 'The demo').
DEMO_CFG_SCALE = 3.0
# Guidance of the shallow steps (DuoSampler's shallow_cfg_scale; None = DEMO_CFG_SCALE, one scale for every row).
# A lower shallow scale beats deep-only at a constant 3, but the deep model on the same schedule gains as much,
# so the demo compares all rows at one scale (README, 'Guidance of the shallow steps').
DEMO_SHALLOW_CFG_SCALE = None
DEMO_N = 160  # 16 per class. With guidance (two forwards per step) 200 took 157 s and 182 s on the 2-core machine
# on one day (2026-12-03; its speed moved 15% between runs): 160 keeps the demo inside 3 minutes on a slow run.
# The DuoDiff rows of the demo: the switch 0.4 and a faster one. 0.2 (`--switches 0.2,0.4,0.6`) is
# left out of the default: its row cost 52 s of a 219 s run on the 2-core machine, past the 3-minute budget.
DEMO_SWITCHES = (0.4, 0.6)


# -----------------------------------------------------------------------------
# The shipped pair
# -----------------------------------------------------------------------------

def load_demo_model(path, device="cpu"):
    """A model from a `.safetensors` file whose metadata holds its spec (what `train` exports)."""
    from safetensors import safe_open

    from .models import create_model
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo weights not found: {path} (reinstall the package, or rebuild them with "
                                "the commands in the README's 'Demo weights' section)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if "spec" not in meta:
            raise ValueError(f"{path}: no 'spec' in the safetensors metadata; expected a file exported by "
                             "`duodiff-fast train` or tools/export_demo.py")
        sd = {k: f.get_tensor(k).float() for k in f.keys()}  # stored fp16 to fit the package; run fp32
    model = create_model(json.loads(meta["spec"]))
    model.load_state_dict(sd, strict=True)
    model.trained_steps = int(meta.get("step", 0))
    model.training_data = meta.get("data") or None  # dataset spec it was trained on (the FID reference)
    return model.to(device).eval()


def load_demo_pair(device="cpu"):
    """(shallow, deep) trained on the built-in Shapes data (see README, 'Demo weights')."""
    return (load_demo_model(ASSETS / DEMO_FILES["shallow"], device),
            load_demo_model(ASSETS / DEMO_FILES["deep"], device))


# -----------------------------------------------------------------------------
# The demo
# -----------------------------------------------------------------------------

def run_demo(out="out/demo", n=DEMO_N, steps=25, switches=DEMO_SWITCHES, solver="ddim", seed=0,
             cfg_scale=DEMO_CFG_SCALE, clip_sample=1.0, reference_n=2000, batch_size=256, device=None, progress=True,
             n_boot=1000, n_boot_fid=200, shallow_cfg_scale=DEMO_SHALLOW_CFG_SCALE):
    """Run every mode from the same noise and labels; returns one dict per mode and writes PNGs + JSON to `out`.

    Per mode: seconds per image and speed-up (measured and from the block count), class accuracy of the
    shipped proxy classifier on the labels the samples were drawn for, proxy FID against held-out images of
    the training data, both with 95% bootstrap intervals, the paired bootstrap interval of the proxy-FID
    difference to deep-only (same noise, same resampled indices), and PSNR against deep-only.

    Guidance: `cfg_scale` on the deep steps, `shallow_cfg_scale` (None = `cfg_scale`) on the shallow ones, in
    every mode (so shallow-only samples every step at `shallow_cfg_scale`)."""
    from tqdm.auto import tqdm

    from .sampling import DuoSampler

    w = "demo"
    n = check_int(n, "n", minimum=2, where=w)  # proxy FID needs two samples for a covariance
    steps = check_int(steps, "steps", minimum=1, where=w)
    batch_size = check_int(batch_size, "batch_size", minimum=1, where=w)
    reference_n = check_int(reference_n, "reference_n", minimum=2, where=w)
    switches = [check_float(v, "switches", minimum=0.0, maximum=1.0, where=w) for v in switches]
    if cfg_scale is not None:
        cfg_scale = check_float(cfg_scale, "cfg_scale", minimum=0.0, where=w)
    if shallow_cfg_scale is not None:
        shallow_cfg_scale = check_float(shallow_cfg_scale, "shallow_cfg_scale", minimum=0.0, where=w)
    _io.check_writable_dir(out, "--out")  # before a minute of sampling, not after
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shallow, deep = load_demo_pair(device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, deep.in_channels, deep.img_size, deep.img_size, generator=gen)
    modes = [("deep-only", 0.0)] + [(f"DuoDiff {s:g}", float(s)) for s in switches] + [("shallow-only", 1.0)]

    def sampler(s):
        return DuoSampler(shallow, deep, schedule=deep.schedule_spec, solver=solver, steps=steps, switch=s,
                          cfg_scale=cfg_scale, shallow_cfg_scale=shallow_cfg_scale,
                          clip_sample=clip_sample if solver != "dpmsolver++" else None)

    warm = sampler(0.0)
    # Balanced labels in order (0, 1, ..., 9, 0, 1, ...): the first strip of side_by_side.png shows each
    # class once, and every class has the same weight in the class accuracy.
    labels = torch.arange(n) % warm.label_range()
    warm.sample(noise=noise[:2], y=labels[:2])  # warm-up outside the clock
    images, rows = {}, []
    bar = tqdm(modes, desc="demo", unit="mode", disable=not progress)
    for name, s in bar:
        smp = sampler(s)
        bar.set_postfix_str(f"{name}: {smp.k}/{steps} shallow steps")
        images[name], seconds = timed_samples(smp, noise, labels, batch_size)
        rows.append(dict(mode=name, switch=s, shallow_steps=smp.k, steps=steps, n=n,
                         seconds_per_image=seconds / n, theoretical_speedup=1.0 / smp.compute_fraction()))
    data = getattr(deep, "training_data", None) or "shapes"
    score_modes(images, labels, rows, data=data, reference_n=reference_n, n_boot=n_boot, n_boot_fid=n_boot_fid,
                seed=seed, device=device)

    _side_by_side(images, os.path.join(out, "side_by_side.png"), ncols=min(10, n))
    _speed_quality_plot(rows, os.path.join(out, "speed_quality.png"))
    _io.write_json(os.path.join(out, "results.json"),
                   dict(rows=rows, solver=solver, steps=steps, n=n, seed=seed, cfg_scale=cfg_scale,
                        shallow_cfg_scale=warm.shallow_cfg_scale,
                        clip_sample=clip_sample, reference_n=reference_n, deep_trained_steps=deep.trained_steps,
                        shallow_trained_steps=shallow.trained_steps))
    _io.write_text(os.path.join(out, "results.md"), markdown(rows) + "\n")
    return rows


def timed_samples(smp, noise, labels, batch_size, after_batch=None):
    """All of `noise` sampled by `smp` in batches: (images clamped to [-1, 1] on the CPU, seconds of sampling).
    `after_batch(smp)`, when given, runs after each batch outside the clock (to read `smp.trace`)."""
    chunks, seconds = [], 0.0
    for i in range(0, noise.shape[0], batch_size):
        t0 = time.perf_counter()
        chunks.append(smp.sample(noise=noise[i:i + batch_size], y=labels[i:i + batch_size]).cpu())
        seconds += time.perf_counter() - t0
        if after_batch is not None:
            after_batch(smp)
    return torch.cat(chunks).clamp(-1, 1), seconds


def score_modes(images, labels, rows, *, data="shapes", reference_n=2000, n_boot=1000, n_boot_fid=200, seed=0,
                device=None, baseline="deep-only"):
    """Fill each row (one per mode, `row['mode']` keys `images`) with its quality and speed against `baseline`
    (sampled from the same noise and labels): measured speed-up, PSNR/MSE to the baseline's samples, class
    accuracy of the shipped proxy classifier with a bootstrap interval, proxy FID against held-out images of
    `data` with a bootstrap interval, and the paired bootstrap interval of the FID difference to the
    baseline. Used by the demo and by bench/early_exit.py."""
    from .eval import class_accuracy, feature_statistics, fid_interval, fidelity, paired_accuracy_difference, \
        paired_fid_difference, reference_images
    from .proxy import ProxyClassifier
    device = torch.device(device or "cpu")
    clf = ProxyClassifier.load(device=device)
    ref_stats = feature_statistics(clf.features(reference_images(data, reference_n)))
    feats = {name: clf.features(x).numpy() for name, x in images.items()}
    base = next(r for r in rows if r["mode"] == baseline)["seconds_per_image"]
    accs = {name: class_accuracy(x, labels, classifier=clf, n_boot=n_boot, seed=seed) for name, x in images.items()}
    for r in rows:
        x = images[r["mode"]]
        r["speedup"] = base / r["seconds_per_image"]
        fid = fidelity(x, images[baseline])
        r["psnr_vs_deep"] = fid["psnr"]
        r["mse_vs_deep"] = fid["mse"]
        acc = accs[r["mode"]]
        r.update(class_acc=acc["acc"], class_acc_low=acc["low"], class_acc_high=acc["high"],
                 class_acc_per_class=[None if c != c else c for c in acc["per_class"]])  # NaN: never asked
        f = fid_interval(feats[r["mode"]], *ref_stats, n_boot=n_boot_fid, seed=seed)
        r.update(proxy_fid=f["fid"], proxy_fid_low=f["low"], proxy_fid_high=f["high"])
        if r["mode"] != baseline:
            d = paired_fid_difference(feats[r["mode"]], feats[baseline], *ref_stats, n_boot=n_boot_fid, seed=seed)
            r.update(fid_diff_vs_deep=d["diff"], fid_diff_low=d["low"], fid_diff_high=d["high"])
            a = paired_accuracy_difference(acc["pred"], accs[baseline]["pred"], labels, n_boot=n_boot, seed=seed)
            r.update(class_acc_diff_vs_deep=a["diff"], class_acc_diff_low=a["low"], class_acc_diff_high=a["high"])
        r["device"] = _device_name(device)
        r["reference"] = f"{data} (held-out seed, {reference_n} images)"
    return rows


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def quality_cells(r) -> str:
    """The four quality cells of one row of score_modes, as markdown: class accuracy, its paired difference
    to the baseline (points), proxy FID, its paired difference; '-' where a row has no difference (the
    baseline, or results written before the accuracy difference existed). Shared by the demo's table and
    bench/early_exit.py's."""
    dacc = "-" if "class_acc_diff_vs_deep" not in r else \
        (f"{100 * r['class_acc_diff_vs_deep']:+.1f} [{100 * r['class_acc_diff_low']:+.1f}, "
         f"{100 * r['class_acc_diff_high']:+.1f}]")
    dfid = "-" if "fid_diff_vs_deep" not in r else \
        f"{r['fid_diff_vs_deep']:+.1f} [{r['fid_diff_low']:+.1f}, {r['fid_diff_high']:+.1f}]"
    return (f"{100 * r['class_acc']:.1f}% [{100 * r['class_acc_low']:.1f}, {100 * r['class_acc_high']:.1f}] | "
            f"{dacc} | {r['proxy_fid']:.1f} [{r['proxy_fid_low']:.1f}, {r['proxy_fid_high']:.1f}] | {dfid}")


def markdown(rows) -> str:
    lines = ["| mode | shallow steps | s/image | speed-up | theoretical | class accuracy [95% CI] | "
             "accuracy - deep (points) [95% CI] | proxy FID [95% CI] | proxy FID - deep [95% CI] | "
             "PSNR vs deep (dB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "-" if r["mode"] == "deep-only" else f"{r['psnr_vs_deep']:.2f}"
        lines.append(f"| {r['mode']} | {r['shallow_steps']}/{r['steps']} | {r['seconds_per_image']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['theoretical_speedup']:.2f}x | {quality_cells(r)} | {psnr} |")
    return "\n".join(lines)


def _side_by_side(images, path, ncols):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import to_uint8
    names = list(images)
    fig, axes = plt.subplots(len(names), 1, figsize=(ncols * 0.9, len(names) * 1.0 + 0.3))
    for ax, name in zip(axes, names):
        strip = to_uint8(images[name][:ncols])  # (ncols, H, W, 3)
        ax.imshow(strip.transpose(1, 0, 2, 3).reshape(strip.shape[1], -1, 3), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("same noise and labels, per row: deep only, DuoDiff at switch points, shallow only",
                 fontsize=9)
    fig.tight_layout()
    _io.savefig(fig, path, dpi=110)
    plt.close(fig)


def _speed_quality_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    sp = [r["speedup"] for r in rows]
    for ax, key, label, scale in ((axes[0], "class_acc", "class accuracy (%)", 100.0),
                                  (axes[1], "proxy_fid", "proxy FID (lower is better)", 1.0)):
        y = [scale * r[key] for r in rows]
        # A bootstrap interval of FID can sit wholly above the estimate (resampling duplicates images, which
        # raises FID): the bar then starts at the point.
        err = [[scale * max(0.0, r[key] - r[f"{key}_low"]) for r in rows],
               [scale * max(0.0, r[f"{key}_high"] - r[key]) for r in rows]]
        ax.errorbar(sp, y, yerr=err, fmt="o-", capsize=3)
        for r, v in zip(rows, y):
            ax.annotate(r["mode"], (r["speedup"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("measured speed-up over deep-only")
        ax.set_ylabel(label + " [95% CI]")
    duo = [r for r in rows if r["mode"] != "deep-only"]
    axes[2].plot([r["shallow_steps"] / r["steps"] for r in duo], [r["psnr_vs_deep"] for r in duo], "s-")
    axes[2].set_xlabel("share of steps on the shallow model")
    axes[2].set_ylabel("PSNR vs deep-only, same noise (dB)")
    fig.suptitle(f"DuoDiff on the demo pair ({rows[0]['device']})", fontsize=9)
    fig.tight_layout()
    _io.savefig(fig, path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------

def cmd_demo(args):
    t0 = time.perf_counter()
    rows = run_demo(out=args.out, n=args.n, steps=args.steps, switches=args.switches, solver=args.solver,
                    seed=args.seed, cfg_scale=args.cfg, shallow_cfg_scale=args.shallow_cfg,
                    clip_sample=args.clip_sample or None,
                    reference_n=args.reference_n,
                    batch_size=args.batch_size, device=args.device)
    best = max((r for r in rows if r["mode"].startswith("DuoDiff")), key=lambda r: r["speedup"])
    print(f"wrote {args.out}/side_by_side.png, speed_quality.png, results.json, results.md "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"fastest DuoDiff setting: {best['speedup']:.2f}x over deep-only (theory {best['theoretical_speedup']:.2f}x), "
          f"class accuracy {100 * best['class_acc']:.1f}% (deep-only {100 * rows[0]['class_acc']:.1f}%), "
          f"proxy FID {best['proxy_fid']:.1f} (deep-only {rows[0]['proxy_fid']:.1f}), PSNR {best['psnr_vs_deep']:.1f} "
          f"dB vs deep-only; timings on {rows[0]['device']}")
    print(markdown(rows))
    return 0


def _switch_list(text):
    import argparse
    parse = argtype_float(0.0, 1.0)
    try:
        return [parse(v) for v in text.split(",") if v.strip()] or [0.4]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"switches: {e}") from None


def add_cli(sub):
    from .cli import parse_shallow_cfg
    p = sub.add_parser("demo", help="deep-only vs DuoDiff with the shipped demo pair: grid, plot, speed-up, "
                                    "fidelity, proxy FID")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--n", "--num-samples", dest="n", type=argtype_int(2), default=DEMO_N)
    p.add_argument("--steps", type=argtype_int(1), default=25)
    p.add_argument("--switches", type=_switch_list, default=list(DEMO_SWITCHES),
                   help="comma list of fractions of the steps in [0, 1] given to the shallow model")
    p.add_argument("--solver", default="ddim", type=str.lower, choices=["ddim", "ddpm", "dpmsolver++"])
    p.add_argument("--cfg", type=argtype_float(0.0), default=DEMO_CFG_SCALE,
                   help="classifier-free guidance scale (diffusers' convention, >= 0; 1 = none; default %(default)s)")
    p.add_argument("--shallow-cfg", type=parse_shallow_cfg, default=DEMO_SHALLOW_CFG_SCALE,
                   help="guidance scale of the shallow steps only (DuoDiff and shallow-only rows); "
                        "'same' = --cfg, 'off' = 1 (unguided); default %(default)s")
    p.add_argument("--clip-sample", type=argtype_float(0.0), default=1.0,
                   help="clamp each step's x0 prediction to [-c, c] (ddim/ddpm; 0 = off), as DDPM does for pixels")
    p.add_argument("--seed", type=argtype_int(0), default=0)
    p.add_argument("--reference-n", type=argtype_int(2), default=2000, help="held-out Shapes images for proxy FID")
    p.add_argument("--batch-size", type=argtype_int(1), default=256)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

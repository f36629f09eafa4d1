"""Probe one trained denoiser: does it read its label, does it pass noise through, are its samples classes?

    python tools/probe_denoiser.py --model runs/deep/ema.safetensors --data shapes-bold --samples 100

`--model`: an `ema.safetensors` written by `duodiff-fast train` (or the shipped demo files), or a training
checkpoint `checkpoints/step_*.pt` (its EMA weights; `--raw` for the raw ones), so any step of a run can
be looked at while it trains. Prints the label probe (eps MSE with the right, a wrong and the null label
at several t), the noise pass-through probe at t = 999 (`duodiff_fast.eval.label_probe` and
`passthrough_probe`), and with `--samples N` the class accuracy of N deep-only DDIM samples (labels
0..9 in turn) with a bootstrap interval; `--grid` writes those samples as a PNG.
These two probes are what found why the first demo pair drew no shapes (README, 'Demo weights').
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from duodiff_fast.eval import class_accuracy, label_probe, passthrough_probe  # noqa: E402


def load(path, raw=False):
    if str(path).endswith(".pt"):
        from duodiff_fast.models import create_model
        ck = torch.load(path, map_location="cpu", weights_only=True)
        model = create_model(ck["spec"])
        model.load_state_dict(ck["model" if raw else "ema"], strict=True)
        model.trained_steps = int(ck["step"])
        return model.eval()
    from duodiff_fast.demo import load_demo_model
    return load_demo_model(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--raw", action="store_true", help="with a .pt checkpoint: the raw weights, not the EMA")
    p.add_argument("--data", default=None, help="dataset spec (default: the one recorded in the file, else shapes)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--t", default="100,300,500,700,900", help="timesteps of the label probe")
    p.add_argument("--samples", type=int, default=0, help="also sample this many images and classify them")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (diffusers convention; 1 = none)")
    p.add_argument("--grid", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = load(a.model, a.raw)
    data = a.data or getattr(model, "training_data", None) or "shapes"
    print(f"{a.model} (step {getattr(model, 'trained_steps', '?')}) on {data}, {a.n} held-out images")
    print("| t | eps MSE, right label | wrong label | null label | wrong/right - 1 | label effect |")
    print("|---|---|---|---|---|---|")
    for r in label_probe(model, data, a.n, [int(v) for v in a.t.split(",")], a.seed):
        print(f"| {r['t']} | {r['mse_right']:.5f} | {r['mse_wrong']:.5f} | {r['mse_null']:.5f} | "
              f"{r['mse_wrong'] / r['mse_right'] - 1:+.1%} | {r['label_effect']:.4f} |")
    pt = passthrough_probe(model)
    print(f"noise pass-through at t={pt['t']}: eps MSE vs x_t {pt['mse']:.5f}, per-patch gain std "
          f"{pt['gain_std']:.4f}, corr(gain, patch norm) {pt['gain_norm_corr']:+.3f}, cosine {pt['cosine']:.4f}")
    if a.samples:
        from duodiff_fast.data import save_grid
        from duodiff_fast.sampling import DuoSampler
        smp = DuoSampler(model, model, schedule=model.schedule_spec, solver="ddim", steps=a.steps, switch=0.0,
                         cfg_scale=a.cfg, clip_sample=1.0)
        y = torch.arange(a.samples) % smp.label_range()
        noise = torch.randn(a.samples, model.in_channels, model.img_size, model.img_size,
                            generator=torch.Generator().manual_seed(a.seed))
        with torch.no_grad():
            x = smp.sample(noise=noise, y=y).clamp(-1, 1)
        ca = class_accuracy(x, y)
        print(f"class accuracy of {a.samples} samples (DDIM {a.steps}, cfg {a.cfg}): {100 * ca['acc']:.1f}% "
              f"[{100 * ca['low']:.1f}, {100 * ca['high']:.1f}]; per class {[round(v, 2) for v in ca['per_class']]}")
        if a.grid:
            save_grid(x, a.grid, nrow=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

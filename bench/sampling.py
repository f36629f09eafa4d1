"""End-to-end sampling benchmark: deep-only vs DuoDiff at several switch points.

Speed does not depend on the weights, so the presets run with random weights. For each mode the
measured speed-up over deep-only is set beside the theoretical one from the block count
(DESIGN.md §2): N D / (3 k + D (N - k)) for k shallow steps out of N with a D-block deep model.

    python bench/sampling.py                     # CPU-sized defaults (a few minutes on 2 cores)
    python bench/sampling.py --batch 128 --steps 50 --dtype bf16   # the GPU setting of DESIGN §7
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

from duodiff_fast.models import create_model
from duodiff_fast.sampling import DuoSampler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    deep = create_model(args.deep).to(device, dtype).eval()
    shallow = create_model(args.shallow or f"{args.deep}_shallow").to(device, dtype).eval()
    noise = torch.randn(args.batch, deep.in_channels, deep.img_size, deep.img_size,
                        generator=torch.Generator().manual_seed(0))

    modes = [("deep-only", 0.0)] + [(f"duodiff@{s:g}", s) for s in args.switches] + [("shallow-only", 1.0)]
    samplers = {name: DuoSampler(shallow, deep, solver=args.solver, steps=args.steps, switch=s)
                for name, s in modes}
    deep_only = samplers["deep-only"]
    y = torch.randint(0, deep_only.label_range(), (args.batch,)) if deep_only.num_classes > 0 else None
    times = {name: [] for name, _ in modes}
    for name, _ in modes:  # warm-up (allocator, autotuning, first-call overheads)
        samplers[name].sample(noise=noise, y=y)
    # Round-robin over modes so that slow drifts of the machine hit every mode alike.
    for _ in range(args.repeats):
        for name, _ in modes:
            t0 = time.perf_counter()
            samplers[name].sample(noise=noise, y=y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["deep-only"])
    date = _dt.datetime.now().isoformat(timespec="seconds")
    rows = []
    for name, s in modes:
        smp = samplers[name]
        sec = statistics.median(times[name])
        theo = 1.0 / smp.compute_fraction()
        rows.append(dict(
            mode=name, switch=s, shallow_steps=smp.k, steps=args.steps, batch=args.batch,
            solver=args.solver, deep=args.deep, deep_blocks=deep.depth_blocks,
            shallow_blocks=shallow.depth_blocks, dtype=args.dtype,
            seconds_median=sec, seconds_all=times[name], images_per_s=args.batch / sec,
            speedup=base / sec, theoretical_speedup=theo, speedup_vs_theory=(base / sec) / theo,
            device=device_name(device), torch=torch.__version__, date=date,
        ))
    return rows


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (f"Sampling benchmark: {r0['deep']} ({r0['deep_blocks']} blocks) + shallow ({r0['shallow_blocks']} blocks), "
            f"{r0['solver']} {r0['steps']} steps, batch {r0['batch']}, {r0['dtype']}, random weights\n"
            f"device: {r0['device']}, torch {r0['torch']}, {r0['date']}\n\n")
    lines = ["| mode | shallow steps | images/s | s/batch | speed-up | theoretical | measured/theory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['shallow_steps']}/{r['steps']} | {r['images_per_s']:.3f} | "
                     f"{r['seconds_median']:.3f} | {r['speedup']:.3f}x | {r['theoretical_speedup']:.3f}x | "
                     f"{r['speedup_vs_theory']:.3f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deep", default="uvit_cifar10_small")
    p.add_argument("--shallow", default=None)
    p.add_argument("--batch", type=int, default=128 if cuda else 2)
    p.add_argument("--steps", type=int, default=50 if cuda else 10)
    p.add_argument("--switches", type=lambda s: [float(v) for v in s.split(",")], default=[0.2, 0.4, 0.6])
    p.add_argument("--solver", default="ddim")
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None)
    p.add_argument("--tolerance", type=float, default=0.03 if cuda else 0.10,
                   help="allowed relative gap between measured and theoretical speed-up")
    p.add_argument("--out", default="bench/results", help="folder for the JSON rows and the markdown table")
    args = p.parse_args(argv)

    rows = run(args)
    table = markdown(rows)
    worst = max(abs(r["speedup_vs_theory"] - 1) for r in rows)
    verdict = (f"worst gap between measured and theoretical speed-up: {worst * 100:.1f}% "
               f"({'within' if worst <= args.tolerance else 'OUTSIDE'} the {args.tolerance * 100:.0f}% bar)")
    if rows[0]["device"].startswith("CPU"):
        verdict += "\nThese are CPU timings; the GPU figures of DESIGN.md §7 need a GPU."
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"sampling_{rows[0]['date'][:10]}_{slug(rows[0]['device'])}")
        with open(stem + ".json", "w") as f:
            json.dump(rows, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(table + "\n" + verdict + "\n")
        print(f"wrote {stem}.json and {stem}.md")
    print(verdict)
    print(table)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every GPU check in one command, within a time budget: the suite a developer runs when a GPU is lent.

    python bench/gpu_suite.py --budget 480 --out $OUT/gpu --pack     # on the GPU machine (8 minutes)
    python bench/gpu_suite.py --dry-run --out /tmp/gpu-dry            # here: the plan, with the GPU parts skipped

Steps, in priority order (each starts only if the budget left covers its minimum, and is cut at its cap;
what does not fit is listed as skipped, with the reason):
  1. environment   nvidia-smi, `python -m duodiff_fast.info --json`
  2. install       `pip install -e . --no-build-isolation --no-deps`, building duodiff_fast._C for sm_90a only
                   with all cores (DUODIFF_CUDA_ARCHS=90a, MAX_JOBS=<cores>); the machine reaches no registry
                   and nothing here needs one (no build-time dependency outside torch, ninja, pybind11)
  3. gpu-tests     `pytest -m gpu`: bf16 dot paths, the CUDA backend against float64 and Triton, graph capture
                   per op and per segment; tests that need diffusers skip cleanly (it is absent there)
  4. kernels       `bench/kernels.py` at the DESIGN §7 shapes (attention, norm family, exit confidence)
  5. sampling      `bench/sampling.py` on a reduced grid in the time left: the U-ViT-S/2 CIFAR pair at batch
                   1/8/128 with every mode (compile peers included), then DiT-XL/2 + DiT-S/2 at batch 1/128
                   (DDIM 50, bf16)
  6. summary       summary.md: each step's status, time and the tail of its log, plus the tables written

Everything lands in --out; the device tool returns at most 8 files, so --pack also puts the folder into
one gpu_suite.tar.gz beside summary.md. To commit: unpack into bench/results/gpu_<date>_<card>/ (README,
"GPU suite").
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Suite:
    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.budget, self.dry = out, budget, dry_run
        self.t0 = time.monotonic()
        self.steps = []
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def skip(self, name, why):
        self.steps.append(dict(step=name, status="skipped", seconds=0.0, note=why))
        print(f"[{name}] skipped: {why}", flush=True)

    def run(self, name, cmd, *, minimum, cap, env=None, reserve=20.0):
        """Run `cmd` if at least `minimum` seconds are left (after `reserve` for the summary)."""
        left = self.left() - reserve
        if left < minimum:
            self.skip(name, f"{left:.0f} s of budget left, it needs at least {minimum:.0f} s")
            return None
        timeout = min(cap, left)
        log = self.out / f"{name}.log"
        print(f"[{name}] {' '.join(map(str, cmd))} (timeout {timeout:.0f} s)", flush=True)
        t = time.monotonic()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as f:
            try:
                rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                    timeout=timeout).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status, rc = f"cut at {timeout:.0f} s", None
        secs = time.monotonic() - t
        self.steps.append(dict(step=name, status=status, seconds=round(secs, 1), log=log.name, returncode=rc))
        print(f"[{name}] {status} in {secs:.0f} s", flush=True)
        return rc

    def note(self, name, status, text):
        self.steps.append(dict(step=name, status=status, seconds=0.0, note=text))


def _tail(path: Path, n=25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _card() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "no-gpu"
    except (OSError, subprocess.SubprocessError):
        return "no-gpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (default 8 minutes)")
    p.add_argument("--out", default=None, help="folder for every result (default bench/results/gpu_<date>_<card>)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: run the plan, skip the GPU parts")
    p.add_argument("--pack", action="store_true", help="also write gpu_suite.tar.gz of the folder")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    args = p.parse_args(argv)

    import torch  # the suite's own process needs only the version and whether there is a GPU

    gpu = torch.cuda.is_available()
    card = _card() if gpu else "no-gpu"
    date = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_{date}_{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}")
    suite = Suite(out, args.budget, args.dry_run or not gpu)
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    cores = os.cpu_count() or 1
    if not gpu and not args.dry_run:
        print("no GPU here: running as --dry-run (the GPU steps are skipped)")

    # 1. environment
    if "environment" not in skip:
        suite.run("environment", [py, "-m", "duodiff_fast.info", "--json"], minimum=5, cap=120)
        if gpu:
            suite.run("nvidia-smi", ["nvidia-smi"], minimum=2, cap=20)

    # 2. install (+ the CUDA extension for sm_90a with all cores)
    build_env = {"DUODIFF_CUDA_ARCHS": "90a", "MAX_JOBS": str(cores), "DUODIFF_FORCE_CUDA_BUILD": "1"}
    if "install" in skip:
        suite.skip("install", "--skip")
    elif suite.dry:
        suite.skip("install", "dry run: `pip install -e . --no-build-isolation --no-deps` with "
                              "DUODIFF_CUDA_ARCHS=90a MAX_JOBS=<cores> runs on the GPU machine")
    else:
        has_sources = any((ROOT / "csrc").glob("*.cu"))
        env = build_env if has_sources and shutil.which("nvcc") else {"DUODIFF_SKIP_CUDA_BUILD": "1"}
        rc = suite.run("install", [py, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "-q"],
                       minimum=30, cap=300, env=env)
        if rc != 0:
            # The tests and benchmarks can still run from the source tree; the extension may JIT-build.
            suite.note("install", "note", "install failed: later steps import from the source tree")

    # 3. GPU tests
    if "gpu-tests" in skip:
        suite.skip("gpu-tests", "--skip")
    elif suite.dry:
        suite.run("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", "tests"],
                  minimum=10, cap=120)
        suite.note("gpu-tests", "skipped", "dry run: GPU tests collected, not run (they skip without a GPU)")
    else:
        suite.run("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
                                f"--junitxml={out / 'gpu_tests.xml'}", "tests"], minimum=60, cap=240)

    # 4. kernel benchmark at the DESIGN §7 shapes
    if "kernels" in skip:
        suite.skip("kernels", "--skip")
    elif suite.dry:
        suite.skip("kernels", "dry run: bench/kernels.py times the kernels on the GPU (its CPU mode is "
                              "`python bench/kernels.py` here)")
    else:
        suite.run("kernels", [py, "bench/kernels.py", "--out", out, "--no-compile-report"], minimum=60, cap=200)

    # 5. end-to-end sampling on a reduced grid, in whatever time is left
    if "sampling" in skip:
        suite.skip("sampling", "--skip")
    elif suite.dry:
        suite.run("sampling", [py, "bench/sampling.py", "--grid", "cpu", "--steps", "2", "--batches", "1",
                               "--repeats", "1", "--sweep", "", "--no-launch-counts", "--out", out],
                  minimum=20, cap=300)
    else:
        # U-ViT-S/2 CIFAR pair first, every mode (torch.compile peers included): the DESIGN §7 bars are set
        # on it; then the T-Stitch DiT pair without the compile peers (max-autotune of DiT-XL takes minutes).
        share = max(60.0, 0.6 * (suite.left() - 40))
        suite.run("sampling-uvit", [py, "bench/sampling.py", "--grid", "gpu", "--pairs", "uvit-s2-cifar",
                                    "--batches", "1,8,128", "--repeats", "3", "--max-seconds", f"{share - 60:.0f}",
                                    "--out", out], minimum=60, cap=share)
        left = suite.left() - 40
        suite.run("sampling-dit", [py, "bench/sampling.py", "--grid", "gpu", "--pairs", "dit-xl2+s2",
                                   "--batches", "1,128", "--repeats", "2", "--no-compile", "--sweep", "",
                                   "--no-launch-counts", "--max-seconds", f"{max(0.0, left - 60):.0f}", "--out",
                                   out / "dit"], minimum=90, cap=max(1.0, left))

    # 6. summary
    lines = [f"# GPU suite: {card}", "",
             f"{datetime.datetime.now().isoformat(timespec='seconds')}; budget {args.budget:.0f} s, used "
             f"{time.monotonic() - suite.t0:.0f} s; torch {torch.__version__}; "
             f"{'DRY RUN (no GPU): the GPU steps were skipped' if suite.dry else 'GPU run'}", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for s in suite.steps:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note', s.get('log', ''))} |")
    for s in suite.steps:
        if s.get("log"):
            lines += ["", f"## {s['step']} (last lines of {s['log']})", "", "```", _tail(out / s["log"]), "```"]
    for md in sorted(out.glob("**/*.md")):
        if md.name != "summary.md":
            lines += ["", f"## {md.name}", "", md.read_text(errors="replace")]
    sys.path.insert(0, str(ROOT))
    from duodiff_fast import _io
    _io.write_text(out / "summary.md", "\n".join(lines) + "\n")
    _io.write_json(out / "suite.json", dict(card=card, budget=args.budget, dry_run=suite.dry, steps=suite.steps))
    if args.pack:
        tar = out / "gpu_suite.tar.gz"
        with tarfile.open(tar, "w:gz") as tf:
            for f in sorted(out.iterdir()):
                if f.name != tar.name:
                    tf.add(f, arcname=f.name)
    print(f"\nwrote {out}/summary.md" + (" and gpu_suite.tar.gz" if args.pack else ""))
    print("\n".join(lines[: 6 + len(suite.steps)]))
    return 0 if all(s["status"] in ("ok", "skipped", "note") for s in suite.steps) else 1


if __name__ == "__main__":
    sys.exit(main())

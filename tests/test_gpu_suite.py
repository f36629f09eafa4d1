"""The one-command GPU suite runs end to end here in its dry-run mode, skipping the GPU parts with notes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--budget", "300",
                           "--out", str(out), "--pack"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| install | skipped |" in summary and "| kernels | skipped |" in summary
    steps = {s["step"]: s for s in json.loads((out / "suite.json").read_text())["steps"]}
    assert steps["environment"]["status"] == "ok" and steps["sampling"]["status"] == "ok"
    assert (out / "gpu_suite.tar.gz").stat().st_size > 0
    assert any(out.glob("sampling_*.json"))  # the CPU-sized sampling run wrote its rows


def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--budget", "30",
                           "--out", str(out), "--skip", "gpu-tests"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:]
    steps = {s["step"]: s for s in json.loads((out / "suite.json").read_text())["steps"]}
    assert steps["sampling"]["status"] == "skipped" and "budget" in steps["sampling"]["note"]


def _sampling_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "bench" / "sampling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampling_bars_are_judged_only_on_enough_repeats():
    import torch
    sampling = _sampling_module()
    # a DuoDiff row 18% off its block-count theory: misses the 10% CPU bar
    rows = [dict(pair="p", batch=1, mode="deep", speedup_vs_deep=1.0, theory=1.0),
            dict(pair="p", batch=1, mode="duodiff-kernels", speedup_vs_deep=1.332, theory=1.625)]
    cpu = torch.device("cpu")
    judged = sampling.check_bars(rows, cpu, repeats=3)
    assert len(judged) == 1 and judged[0]["ok"] is False and abs(judged[0]["value"] - 0.1803) < 1e-3
    single = sampling.check_bars(rows, cpu, repeats=1)
    assert single[0]["ok"] is None and single[0]["value"] == judged[0]["value"]
    assert "1 repeat" in single[0]["not_judged"]
    env = dict(device="CPU test", date="2026-01-01", torch="x", solver="ddim", steps=2, dtype="fp32", switch=0.4)
    table = sampling.markdown(dict(env=env, rows=[], pairs={}, bars=single))
    assert "not judged (1 repeat(s); bars need 3)" in table
    assert "| NO |" in sampling.markdown(dict(env=env, rows=[], pairs={}, bars=judged))
    # a row within the bar is met when judged
    rows[1]["speedup_vs_deep"] = 1.6
    assert sampling.check_bars(rows, cpu, repeats=3)[0]["ok"] is True

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

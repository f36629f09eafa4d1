"""Packaging: the CUDA build switch and a pure-Python wheel on a machine without CUDA."""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_setup():
    spec = importlib.util.spec_from_file_location("duodiff_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # guarded: defining functions only, setup() is not called
    return mod


def test_skip_switch_wins_over_everything():
    plan = load_setup().cuda_build_plan
    assert plan({"DUODIFF_SKIP_CUDA_BUILD": "1", "DUODIFF_FORCE_CUDA_BUILD": "1"}, ["csrc/x.cu"]) == (
        False, "DUODIFF_SKIP_CUDA_BUILD is set")


def test_no_sources_builds_nothing():
    build, reason = load_setup().cuda_build_plan({}, [])
    assert not build and "no sources" in reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch path")
def test_cpu_torch_builds_nothing_even_when_forced():
    build, reason = load_setup().cuda_build_plan({"DUODIFF_FORCE_CUDA_BUILD": "1"}, ["csrc/x.cu"])
    assert not build and "CPU build" in reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch would build the extension")
def test_wheel_is_pure_python_and_maps_kernels(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    wheel = next(tmp_path.glob("duodiff_fast-*.whl"))
    assert wheel.name.endswith("py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "duodiff_fast/kernels/__init__.py" in names
    for module in ("ops/backends/triton.py", "ops/backends/cuda.py", "ops/measured_order.json",
                   "sampling/graphs.py", "sampling/sharded.py", "models/layers.py"):
        assert f"duodiff_fast/{module}" in names, module
    for asset in ("proxy_classifier", "demo_deep", "demo_shallow"):  # shipped weights, read offline
        assert f"duodiff_fast/assets/{asset}.safetensors" in names, asset
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must install as duodiff_fast.kernels only"
    assert not any(n.endswith(".so") for n in names)
    tops = {n.split("/")[0] for n in names if not n.startswith("duodiff_fast-")}
    assert tops == {"duodiff_fast"}, tops

"""Ahead-of-time compile report of the attention kernel (DESIGN §7 CPU bar: no spills, HGMMA on sm_90a)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compile_report", ROOT / "bench" / "compile_report.py")
compile_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_report)

pytestmark = pytest.mark.skipif(
    bool(compile_report.missing_tools()),
    reason=f"needs {', '.join(compile_report.missing_tools())} (triton's NVIDIA backend)")


def test_attention_compiles_without_spills_and_uses_tensor_cores(tmp_path):
    # A child process without TRITON_INTERPRET: interpreted kernels cannot be compiled. The first
    # config of each head dim (64, 72) keeps the test short on a cold Triton cache.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--compile-report",
                           "--kernels", "attention", "--max-configs", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert (tmp_path / "compile_report.md").read_text().count("| attention |") == len(report["rows"])
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"} and len(rows) == 4
    for r in rows:
        assert "error" not in r, r
        assert r["regs"] > 0 and r["smem_bytes"] > 0, r
        if r["arch"] == "sm_90a":
            assert r["ptx_target"] == "sm_90a", r
            assert r["spill_bytes"] == 0 and r["local_ld_st"] == 0, f"spills on sm_90a: {r}"
            assert r["hgmma"] > 0, f"no HGMMA (wgmma) on sm_90a: {r}"
        else:
            assert r["hmma"] > 0 and r["hgmma"] == 0, f"expected mma.sync (HMMA) on sm_80: {r}"


def test_sass_and_res_usage_parsing():
    sass = """
        /*0090*/                   HFMA2.MMA R0, -RZ, RZ, 0, 0 ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*00b0*/              @P0  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*00c0*/                   STL.64 [R1], R2 ;
        /*00d0*/                   LDL R3, [R1+0x8] ;
    """
    counts = compile_report.sass_counts(sass)
    assert counts == {"hgmma": 1, "hmma": 1, "local_ld_st": 2, "sass_instructions": 5}
    usage = compile_report.res_usage(" Function k:\n  REG:168 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:568")
    assert usage == {"regs": 168, "stack_bytes": 16, "static_smem_bytes": 0, "local_bytes": 8}

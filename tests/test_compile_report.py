"""Ahead-of-time compile report (DESIGN §6 / §7 CPU bars: on sm_90a no spills, no serialized wgmma, HGMMA in
every 16-bit attention candidate; issue 9: 16-byte loads and stores in the norm family).

Two checks, both needing Triton's NVIDIA tools but no GPU:
- live: this machine's Triton compiles every bf16 attention candidate (every head dim x every config its
  autotuner can pick), the norm family and exit confidence for sm_90a, in child processes (compiling
  needs a process without TRITON_INTERPRET), and the rules hold for each;
- committed: bench/results/compile_report.json describes the current kernels (each row's spec_key hashes
  the kernel sources and the spec) for every candidate, fp16 and bf16, sm_90a and sm_80, on this
  machine's Triton 3.9 and on Triton 3.6 (the GPU machine's, compiled from a side venv), and obeys the
  same rules. When a kernel changes, regenerate it (15-45 minutes on 2 cores, depending on load):
      python bench/compile_report.py --triton local 3.6 --jobs 2 --out bench/results
"""
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

needs_tools = pytest.mark.skipif(
    bool(compile_report.missing_tools()),
    reason=f"needs {', '.join(compile_report.missing_tools())} (triton's NVIDIA backend)")
COMMITTED = ROOT / "bench" / "results" / "compile_report.json"
TRITON_VERSIONS = ("3.9.0", "3.6.0")  # this project's CPU machines and the GPU machine
REGENERATE = "python bench/compile_report.py --triton local 3.6 --jobs 2 --out bench/results"


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def rule_violations(rows):
    """Every way a report row breaks the rules, as readable strings."""
    bad = []
    for r in rows:
        where = f"[triton {r.get('triton')}] {r['kernel']} {r['config']} {r['arch']}"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["arch"] != "sm_90a":
            continue
        if r["ptx_target"] != "sm_90a":
            bad.append(f"{where}: PTX target {r['ptx_target']}")
        if r["spill_bytes"] or r["local_ld_st"]:
            bad.append(f"{where}: spills {r['spill_bytes']} bytes ({r['local_ld_st']} LDL/STL)")
        if r["serialized"]:
            bad.append(f"{where}: serialized wgmma ({r['depbar']} WARPGROUP.DEPBAR for {r['hgmma']} HGMMA; "
                       f"ptxas: {r.get('ptxas_warnings')})")
        if r["kernel"] == "attention" and not r["config"].startswith("fp32") and r["hgmma"] == 0:
            bad.append(f"{where}: no HGMMA (wgmma)")
        if r["kernel"].startswith("norm.") and (r["stg_narrow"] or r["ldg128"] < r["stg128"] or not r["stg128"]):
            # Stores are only the row streams; x (and update) loads are at least as many 16-byte loads as
            # the 16-byte stores of y (and the residual). Narrow loads left are the [C] parameter vectors.
            bad.append(f"{where}: row loads/stores not all 16-byte ({r['ldg128']} LDG.128, {r['stg128']} "
                       f"STG.128, {r['stg_narrow']} narrower STG)")
    return bad


def test_sass_and_ptxas_log_parsing():
    sass = """
        /*0090*/                   HFMA2.MMA R0, -RZ, RZ, 0, 0 ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*00a8*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00b0*/              @P0  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*00c0*/                   STL.64 [R1], R2 ;
        /*00d0*/                   LDL R3, [R1+0x8] ;
        /*00e0*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*00f0*/              @!P1 LDG.E.EF.128 R8, desc[UR6][R2.64+0x10] ;
        /*0100*/                   LDG.E.LTC128B.U16 R9, desc[UR6][R6.64] ;
        /*0110*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        /*0120*/                   STG.E desc[UR6][R2.64], R4 ;
        /*0130*/                   WARPGROUP.ARRIVE ;
    """
    counts = compile_report.sass_counts(sass)
    assert counts == {"hgmma": 1, "hmma": 1, "depbar": 1, "local_ld_st": 2, "ldg128": 2, "ldg_narrow": 1,
                      "stg128": 1, "stg_narrow": 1, "sass_instructions": 12}
    usage = compile_report.res_usage(" Function k:\n  REG:168 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:568")
    assert usage == {"regs": 168, "stack_bytes": 16, "static_smem_bytes": 0, "local_bytes": 8}
    log = ("ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to non wgmma instructions defining accumulator registers of a wgmma between start "
           "and end of the pipeline stage in the function 'k' in line 2267\nptxas info    : Used 168 registers")
    warnings = compile_report.ptxas_warnings(log)
    assert len(warnings) == 1 and warnings[0].startswith("(C7515) Potential Performance Loss")
    assert compile_report.is_serialized(26, 4, []) is False
    assert compile_report.is_serialized(26, 26, []) is True  # one wait per HGMMA: the SASS says it
    assert compile_report.is_serialized(26, 4, warnings) is True  # ptxas says it
    assert compile_report.is_serialized(0, 0, []) is False
    c7511 = [("(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
              "insufficient register resources for the wgmma pipeline in the function 'k' in line 712")]
    assert compile_report.is_serialized(48, 7, c7511) is True


def test_rules_catch_each_fault():
    good = {"kernel": "attention", "config": "bf16 D64", "arch": "sm_90a", "ptx_target": "sm_90a",
            "spill_bytes": 0, "local_ld_st": 0, "serialized": False, "hgmma": 26, "depbar": 4,
            "stg_narrow": 0, "ldg128": 4, "stg128": 4}
    assert rule_violations([good]) == []
    for change in ({"spill_bytes": 8}, {"serialized": True}, {"hgmma": 0}, {"error": "boom"}):
        assert len(rule_violations([{**good, **change}])) == 1, change
    norm = {**good, "kernel": "norm.layer_norm", "config": "bf16 C=1152", "hgmma": 0}
    assert rule_violations([norm]) == []
    assert len(rule_violations([{**norm, "stg_narrow": 2}])) == 1
    assert len(rule_violations([{**norm, "ldg128": 1, "stg128": 9}])) == 1
    assert rule_violations([{**good, "arch": "sm_80", "hgmma": 0, "serialized": True}]) == []


def _current_specs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--list-specs"],
                          capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@needs_tools
def test_committed_report_covers_every_candidate_on_both_tritons():
    specs = _current_specs()
    kernels = {s["kernel"] for s in specs}
    assert {"attention", "norm.layer_norm", "norm.gated_adaln", "exit_confidence"} <= kernels
    # every head dim the op accepts x every autotuner candidate, fp16 and bf16
    attention = [s for s in specs if s["kernel"] == "attention"]
    assert {s["config"].split()[1] for s in attention} == {f"D{d}" for d in (32, 48, 64, 72, 80, 96, 128)}
    assert {s["config"].split()[0] for s in attention} == {"bf16", "fp16"}
    assert len(attention) == 54

    report = json.loads(COMMITTED.read_text())
    rows = report["rows"]
    have = {(r["spec_key"], r["arch"], r["triton"]) for r in rows if "spec_key" in r}
    missing = [f"[triton {tv}] {s['kernel']} {s['config']} {arch}" for tv in TRITON_VERSIONS
               for s in specs for arch in compile_report.ARCHS if (s["spec_key"], arch, tv) not in have]
    assert not missing, (f"{COMMITTED.relative_to(ROOT)} does not describe the current kernels ({len(missing)} "
                         f"rows missing or stale, e.g. {missing[:3]}); regenerate: {REGENERATE}")
    current = {s["spec_key"] for s in specs}
    bad = rule_violations([r for r in rows if r.get("spec_key") in current])
    assert not bad, "\n".join(bad)
    for tv in TRITON_VERSIONS:  # the rows name their Triton and ptxas
        ptxas = {r["ptxas"] for r in rows if r["triton"] == tv and r["arch"] == "sm_90a"}
        assert len(ptxas) == 1 and None not in ptxas, (tv, ptxas)


@needs_tools
@pytest.mark.slow
def test_live_compile_every_bf16_attention_candidate_norm_and_exit_on_sm_90a(tmp_path):
    """This machine's Triton, now: no spills, no serialized wgmma, HGMMA, 16-byte norm rows. Two child
    processes share the compiles (about 3 minutes on 2 cores)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--arch", "sm_90a", "--jobs", "2",
         "--triton", "local",  # never install Triton 3.6 from a test: its rows are the committed ones
         "--kernels", "attention", "norm", "exit_confidence", "--only-dtype", "bf16", "--out", str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=1800, check=False)
    print(proc.stdout[-3000:])
    report = json.loads((tmp_path / "compile_report.json").read_text())
    rows = report["rows"]
    att = [r for r in rows if r["kernel"] == "attention"]
    assert len(att) == 27 and {r["arch"] for r in rows} == {"sm_90a"}, (len(att), proc.stderr[-2000:])
    assert any(r["kernel"].startswith("norm.") for r in rows) and any(r["kernel"] == "exit_confidence" for r in rows)
    bad = rule_violations(rows)
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "compile_report.md").read_text()
    summary, table = md.split("## Every candidate")
    assert table.count("| attention |") == len(att)
    assert "| sm_90a | attention | 27 | 0 | 0 | 0 |" in summary, summary  # candidates, spilling, serialized, errors

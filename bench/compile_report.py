"""Ahead-of-time compile report: every kernel's `aot_specs()` compiled for sm_90a and sm_80, no GPU needed.

For each (kernel, config, arch): `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options=dict(num_warps, num_stages))`, then the cubin is read with
the cuobjdump that ships in Triton's NVIDIA backend:
- `cuobjdump -res-usage`: REG, STACK, SHARED (static), LOCAL. Stack + local bytes are the spill figure
  (Triton kernels use no local arrays, so any local memory is register spill);
- `cuobjdump -sass`: counts of HGMMA (Hopper warpgroup MMA, sm_90a only), HMMA (Ampere-style mma.sync)
  and LDL/STL (local loads/stores) instructions.
Shared memory is the larger of cuobjdump's static SHARED and Triton's dynamic `metadata.shared`.

Run through `python bench/kernels.py --compile-report --out DIR` (writes compile_report.json and .md).
Must run without TRITON_INTERPRET=1: under the interpreter `@triton.jit` yields functions that cannot be
compiled. Works with triton 3.9 (the CPU machine) and 3.6 (the GPU machine); older ASTSource spellings
are guarded below.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

KERNEL_MODULES = ("attention", "norm", "exit_confidence")
ARCHS = {"sm_90a": 90, "sm_80": 80}  # Triton emits sm_90a for capability 90 (wgmma needs the 'a' target)
COLUMNS = ("kernel", "config", "arch", "regs", "spill_bytes", "smem_bytes", "hgmma", "hmma", "local_ld_st",
           "num_warps", "num_stages", "compile_s")


def find_tool(name: str) -> str | None:
    """Path of a CUDA binary tool: Triton's knob (honours TRITON_<TOOL>_PATH), Triton's bundled copy, PATH."""
    try:
        import triton

        knob = getattr(getattr(triton, "knobs", None), "nvidia", None)
        tool = getattr(knob, name.replace("-", "_"), None) if knob is not None else None
        path = getattr(tool, "path", None) if tool is not None else None
        if path and os.path.exists(path):
            return path
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except (ImportError, AttributeError, RuntimeError, OSError):
        pass  # fall through to PATH: an old triton without knobs, or no bundled tools
    return shutil.which(name)


def missing_tools() -> list[str]:
    return [t for t in ("ptxas", "cuobjdump") if find_tool(t) is None]


def _ast_source(spec: dict):
    import triton

    ASTSource = triton.compiler.ASTSource
    fn, sig, cx, attrs = spec["fn"], spec["signature"], spec.get("constexprs") or {}, spec.get("attrs")
    try:  # triton >= 3.3 (3.6 on the GPU machine, 3.9 here): constexprs by name, attrs as a dict
        return ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), None
    except TypeError:
        # older spelling: `constants=` and no dict attrs; the divisibility hints are dropped (noted)
        return ASTSource(fn=fn, signature=sig, constants=cx), "attrs dropped (old ASTSource API)"


def _target(arch: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # triton < 3.0 kept it in triton.compiler
        from triton.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def sass_counts(sass: str) -> dict:
    """Instruction counts from `cuobjdump -sass` text (opcode field only: HFMA2.MMA is not an HMMA)."""
    counts = {"hgmma": 0, "hmma": 0, "local_ld_st": 0, "sass_instructions": 0}
    for line in sass.splitlines():
        m = _OPCODE.match(line)
        if not m:
            continue
        op = m.group(1)
        counts["sass_instructions"] += 1
        if op == "HGMMA":
            counts["hgmma"] += 1
        elif op == "HMMA":
            counts["hmma"] += 1
        elif op in ("LDL", "STL"):
            counts["local_ld_st"] += 1
    return counts


def res_usage(text: str) -> dict:
    """REG/STACK/SHARED/LOCAL of the (first) function in `cuobjdump -res-usage` output."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack_bytes": stack, "static_smem_bytes": shared, "local_bytes": local}


def analyse_cubin(cubin: bytes) -> dict:
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = (subprocess.run([cuobjdump, flag, path], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    return {**res_usage(usage), **sass_counts(sass)}


def compile_spec(spec: dict, arch_name: str) -> dict:
    """One row of the report (an `error` field instead of figures when compilation fails)."""
    import triton
    from triton.runtime.jit import JITFunction

    row = {"kernel": spec["kernel"], "config": spec["config"], "arch": arch_name,
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    if not isinstance(spec["fn"], JITFunction):
        raise TypeError("kernels were imported with TRITON_INTERPRET=1 (interpreted functions cannot be "
                           "compiled); run the compile report in a process without it")
    t0 = time.perf_counter()
    try:
        src, note = _ast_source(spec)
        kernel = triton.compile(src, target=_target(ARCHS[arch_name]),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as e:  # noqa: BLE001 -- a kernel that fails to compile is a report row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    if note:
        row["note"] = note
    fig = analyse_cubin(kernel.asm["cubin"])
    row.update(fig)
    row["spill_bytes"] = fig["stack_bytes"] + fig["local_bytes"]
    row["smem_bytes"] = max(int(getattr(kernel.metadata, "shared", 0) or 0), fig["static_smem_bytes"])
    ptx_target = re.search(r"^\.target\s+(\S+)", kernel.asm.get("ptx", ""), re.MULTILINE)
    row["ptx_target"] = ptx_target.group(1) if ptx_target else None
    return row


def collect_specs(kernels=None, max_configs=None) -> list[dict]:
    """aot_specs() of every kernel module (or those named in `kernels`; 'norm' selects all norm.*),
    at most `max_configs` per kernel name (in the order the module lists them)."""
    specs, seen = [], {}
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"duodiff_fast.kernels.{name}")
        for spec in mod.aot_specs():
            kname = spec["kernel"]
            if kernels and not any(kname == k or kname.startswith(k + ".") for k in kernels):
                continue
            seen[spec["kernel"]] = seen.get(spec["kernel"], 0) + 1
            if max_configs is None or seen[spec["kernel"]] <= max_configs:
                specs.append(spec)
    return specs


def run(kernels=None, archs=tuple(ARCHS), max_configs=None, progress=print) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the compile report needs real @triton.jit functions")
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(f"compile report needs {', '.join(missing)} "
                                "(shipped with triton's NVIDIA backend)")
    specs = collect_specs(kernels, max_configs)
    if not specs:
        raise ValueError(f"no aot_specs() matched {kernels}")
    rows = []
    for spec in specs:
        for arch in archs:
            row = compile_spec(spec, arch)
            rows.append(row)
            if progress:
                tail = f"  ERROR {row['error']}" if "error" in row else f"  ({row.get('compile_s', 0)} s)"
                progress(f"  compiled {row['kernel']:<24} {row['arch']:<7} {row['config']}{tail}")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table (also printed)."""
    head = "| " + " | ".join(COLUMNS) + " | error |"
    sep = "|" + "|".join("---" for _ in range(len(COLUMNS) + 1)) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + f" | {r.get('error', '')} |"
            for r in rows]
    return "\n".join([head, sep, *body])


def meta() -> dict:
    import triton

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "triton": triton.__version__,
            "cuobjdump": find_tool("cuobjdump"), "ptxas": find_tool("ptxas"), "archs": list(ARCHS)}


def write(rows: list[dict], out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = meta()
    for r in rows:
        r.setdefault("triton", m["triton"])
        r.setdefault("date", m["date"])
    jpath, mpath = out / "compile_report.json", out / "compile_report.md"
    jpath.write_text(json.dumps({"meta": m, "rows": rows}, indent=2) + "\n")
    notes = [
        "# Ahead-of-time compile report",
        "",
        f"triton {m['triton']}, {m['date']}; cuobjdump `-res-usage` and `-sass` on each cubin.",
        "spill_bytes = STACK + LOCAL; smem_bytes = max(static SHARED, Triton's dynamic shared memory);",
        "hgmma / hmma / local_ld_st = SASS instruction counts.",
        "",
        format_table(rows),
        "",
    ]
    mpath.write_text("\n".join(notes))
    return jpath, mpath

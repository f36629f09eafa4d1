"""Offline check of the CUDA C++ kernels in csrc/: compile, read the SASS, syntax-check the binding.

No GPU needed. For every csrc/*.cu and every arch (sm_80, sm_90a):
- `nvcc -cubin -arch=sm_XX -Xptxas -v` with the extension's own flags (duodiff_fast/_cpp_lib.py):
  a compile error fails the row; ptxas' per-kernel registers, stack frame and spill bytes are parsed;
- `cuobjdump -res-usage` and `-sass` on the cubin (the cuobjdump Triton ships, see compile_report.py):
  per kernel REG / STACK / LOCAL and SASS counts: HMMA (mma.sync), HGMMA (wgmma), 16-byte global loads
  and stores (LDG/STG with a .128 suffix, and LDGSTS.128 for cp.async), LDL/STL, WARPSYNC; plus
  `hmma_in_loop`: HMMA instructions inside a loop (between a backward branch and its target), the
  "tensor cores in the main loop" check.
Then `g++ -fsyntax-only` of csrc/bindings.cpp against the installed torch headers (the CPU torch wheel
ships c10/cuda headers; CUDA's own headers come from the nvcc install).

Checks (each a pass/fail entry of the report, the test suite asserts them): every compile succeeds, no
kernel spills (stack + local bytes and LDL/STL all zero), the attention kernels have HMMA in their main
loop on sm_80 (and sm_90a), the exit-confidence tensor-core kernels have HMMA, the vector norm kernels
use 16-byte loads and stores, the binding passes the syntax check.

    python bench/csrc_report.py [--out bench/results] [--archs sm_80,sm_90a] [--jobs N] [--no-bindings]

writes csrc_report.json and csrc_report.md (rows in the spirit of compile_report.py, one per kernel
instance and arch) and exits non-zero when a check fails. Nothing is cached between runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("sm_80", "sm_90a")
COLUMNS = ("kernel", "config", "arch", "regs", "spill_bytes", "smem_bytes", "hgmma", "hmma", "hmma_in_loop",
           "ldg128", "stg128", "ldgsts128", "local_ld_st", "warpsync", "compile_s")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The build settings (stdlib-only module, loaded by path) and cuobjdump lookup of the Triton report.
build = _load("duodiff_cpp_lib", ROOT / "duodiff_fast" / "_cpp_lib.py")
compile_report = _load("compile_report", Path(__file__).with_name("compile_report.py"))


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def cuda_include(nvcc: str) -> str | None:
    """The CUDA headers next to nvcc (follows wrapper scripts like /usr/local/bin/nvcc -> cuda-13.0)."""
    candidates = [Path(nvcc).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    try:
        text = Path(nvcc).read_text(errors="ignore")[:4096]
        m = re.search(r"(/\S+)/bin/nvcc", text)
        if m:
            candidates.insert(0, Path(m.group(1)) / "include")
    except OSError:
        pass
    for c in candidates:
        if (c / "cuda_runtime.h").exists():
            return str(c)
    return None


def missing_tools() -> list[str]:
    missing = [] if find_nvcc() else ["nvcc"]
    if compile_report.find_tool("cuobjdump") is None:
        missing.append("cuobjdump")
    return missing


def cu_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """{mangled name: {regs, stack_frame, spill_stores, spill_loads}} from `-Xptxas -v` output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
    return out


_RES = re.compile(r"Function ([^\s:]+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict:
    """{mangled name: {regs, stack_bytes, static_smem_bytes, local_bytes}} from `cuobjdump -res-usage`."""
    return {m.group(1): {"regs": int(m.group(2)), "stack_bytes": int(m.group(3)),
                         "static_smem_bytes": int(m.group(4)), "local_bytes": int(m.group(5))}
            for m in _RES.finditer(text.replace("\n", " ").replace("Function", "\nFunction"))}


_SASS_FN = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*(.*)$")
_BRA_TARGET = re.compile(r"(?:`\()?0x([0-9a-f]+)")


def split_sass(text: str) -> dict:
    """{mangled name: [(address, opcode, suffixes, operands)]} from `cuobjdump -sass`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _SASS_FN.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _SASS_INS.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3), m.group(4)))
    return out


def sass_counts(instructions) -> dict:
    """Instruction counts of one kernel, and how many HMMA / HGMMA lie inside a loop."""
    c = {"hgmma": 0, "hmma": 0, "ldg128": 0, "stg128": 0, "ldgsts128": 0, "local_ld_st": 0, "warpsync": 0,
         "sass_instructions": len(instructions)}
    loops = []
    for addr, op, suffix, operands in instructions:
        wide = ".128" in suffix
        if op == "HGMMA":
            c["hgmma"] += 1
        elif op == "HMMA":
            c["hmma"] += 1
        elif op == "LDG" and wide:
            c["ldg128"] += 1
        elif op == "STG" and wide:
            c["stg128"] += 1
        elif op == "LDGSTS" and wide:
            c["ldgsts128"] += 1
        elif op in ("LDL", "STL"):
            c["local_ld_st"] += 1
        elif op == "WARPSYNC":
            c["warpsync"] += 1
        if op in ("BRA", "JMP"):
            m = _BRA_TARGET.search(operands)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    in_loop = [ins for ins in instructions if any(lo <= ins[0] <= hi for lo, hi in loops)]
    c["hmma_in_loop"] = sum(op == "HMMA" for _, op, _, _ in in_loop)
    c["hgmma_in_loop"] = sum(op == "HGMMA" for _, op, _, _ in in_loop)
    return c


def demangle(names: list[str]) -> dict:
    """Mangled -> short readable name ('attention_fwd_kernel<bf16, 64, 64, 2>'), via c++filt if present."""
    readable = dict(zip(names, names))
    tool = shutil.which("c++filt")
    if tool and names:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            readable = dict(zip(names, lines))
    out = {}
    for mangled, name in readable.items():
        name = name.replace("(anonymous namespace)::", "").replace("duo::", "")
        name = re.sub(r"^void\s+", "", name)
        depth = 0
        for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside the template args
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                name = name[:i]
                break
        out[mangled] = name.replace("true", "1").replace("false", "0")
    return out


def split_name(name: str) -> tuple[str, str]:
    """'norm_fwd_kernel<bf16, 1, 1, 0>' -> ('norm_fwd_kernel', 'bf16, 1, 1, 0')."""
    m = re.match(r"^(?:void\s+)?([\w:]+)(?:<(.*)>)?$", name.strip())
    return (m.group(1), m.group(2) or "") if m else (name, "")


# --------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------

def compile_one(src: Path, arch: str, workdir: Path) -> list[dict]:
    """Rows for every kernel of `src` on `arch` (one row with an `error` when compilation fails)."""
    nvcc = find_nvcc()
    cubin = workdir / f"{src.stem}.{arch}.cubin"
    flags = [f for f in build.NVCC_FLAGS if f != "-lineinfo"]
    cmd = [nvcc, *flags, "-cubin", f"-arch={arch}", "-Xptxas", "-v", f"-I{CSRC}", "-o", str(cubin), str(src)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = round(time.perf_counter() - t0, 2)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        err = [ln for ln in log.splitlines() if "error" in ln.lower()] or log.strip().splitlines()[-3:]
        return [{"file": src.name, "kernel": src.stem, "config": "", "arch": arch, "compile_s": seconds,
                 "error": " | ".join(err)[:2000]}]
    ptxas = parse_ptxas(log)
    cuobjdump = compile_report.find_tool("cuobjdump")
    usage = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True,
                                           text=True, check=True).stdout)
    sass = split_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    names = sorted(set(ptxas) | set(usage) | set(sass))
    readable = demangle(names)
    warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
    rows = []
    for mangled in names:
        kernel, config = split_name(readable[mangled])
        px, ru = ptxas.get(mangled, {}), usage.get(mangled, {})
        row = {"file": src.name, "kernel": kernel, "config": config, "arch": arch,
               "regs": ru.get("regs", px.get("regs")),
               "spill_bytes": ru.get("stack_bytes", 0) + ru.get("local_bytes", 0)
               + px.get("spill_stores", 0) + px.get("spill_loads", 0),
               "ptxas_stack_frame": px.get("stack_frame"), "ptxas_spill_stores": px.get("spill_stores"),
               "ptxas_spill_loads": px.get("spill_loads"), "smem_bytes": ru.get("static_smem_bytes", 0),
               "compile_s": seconds, "mangled": mangled}
        row.update(sass_counts(sass.get(mangled, [])))
        if warnings:
            row["warnings"] = warnings[:5]
        rows.append(row)
    return rows


def check_bindings() -> dict:
    """g++ -fsyntax-only of csrc/bindings.cpp against the installed torch headers."""
    row = {"file": "bindings.cpp", "check": "g++ -fsyntax-only"}
    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = find_nvcc()
    try:
        import torch
        from torch.utils.cpp_extension import include_paths
    except ImportError as e:
        return {**row, "error": f"torch is not importable: {e}"}
    cuda_inc = cuda_include(nvcc) if nvcc else None
    if cxx is None or cuda_inc is None:
        return {**row, "error": "needs g++ and the CUDA headers (cuda_runtime.h) of an nvcc install"}
    py_inc = sysconfig.get_paths()["include"]
    macros = [f"-D{k}={v}" for k, v in build.build_macros("80;90a", torch.__version__, torch.version.cuda)]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H",
           # A CPU torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (build switches only).
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *macros]
    for inc in [*include_paths(), py_inc, cuda_inc]:
        cmd += ["-isystem", inc]
    cmd += [f"-I{CSRC}", str(CSRC / "bindings.cpp")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["torch"] = torch.__version__
    diagnostics = [ln for ln in (res.stdout + res.stderr).splitlines() if "error" in ln or "warning" in ln]
    if res.returncode != 0:
        row["error"] = " | ".join(diagnostics[:10]) or (res.stderr.strip()[-2000:])
    elif diagnostics:
        row["warnings"] = diagnostics[:10]
    return row


# --------------------------------------------------------------------------------------------------
# Checks and output
# --------------------------------------------------------------------------------------------------

def checks(rows: list[dict], bindings: dict | None) -> list[dict]:
    """The pass / fail list the tests assert (each with the rows that fail it)."""
    def named(prefix):
        return [r for r in rows if "error" not in r and r["kernel"].startswith(prefix)]

    def check(name, bad, needed=None):
        ok = not bad and (needed is None or needed)
        return {"check": name, "ok": bool(ok),
                "failing": [f"{r['kernel']}<{r['config']}> {r['arch']}" for r in bad][:20]
                + ([] if needed is None or needed else ["no such kernel compiled"])}

    out = [
        check("every .cu compiles for every arch", [r for r in rows if "error" in r]),
        check("no spills (stack, local memory, LDL/STL)",
              [r for r in rows if "error" not in r and (r["spill_bytes"] or r["local_ld_st"])]),
        check("attention: HMMA in the main loop (sm_80 and sm_90a)",
              [r for r in named("attention_fwd_kernel") if r["hmma_in_loop"] == 0],
              named("attention_fwd_kernel")),
        check("exit_confidence: HMMA in the tensor-core kernels",
              [r for r in named("exit_mma_kernel") if r["hmma_in_loop"] == 0], named("exit_mma_kernel")),
        check("norm: 16-byte loads and stores in the vector kernels",
              [r for r in named("norm_fwd_kernel") if r["ldg128"] == 0 or r["stg128"] == 0],
              named("norm_fwd_kernel")),
        check("no convergence code (WARPSYNC) in the tensor-core kernels",
              [r for r in named("attention_fwd_kernel") + named("exit_mma_kernel") if r["warpsync"]]),
    ]
    if bindings is not None:
        out.append({"check": "bindings.cpp passes g++ -fsyntax-only against the torch headers",
                    "ok": "error" not in bindings, "failing": [bindings["error"]] if "error" in bindings else []})
    return out


def run(archs=ARCHS, sources=None, jobs=None, with_bindings=True, progress=print) -> dict:
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(f"csrc report needs {', '.join(missing)}")
    sources = cu_sources() if sources is None else sources
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    rows = []
    bindings = None
    with tempfile.TemporaryDirectory(prefix="csrc_report_") as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(compile_one, src, arch, Path(tmp)): (src, arch) for src in sources for arch in archs}
        bind_future = pool.submit(check_bindings) if with_bindings else None
        for fut in concurrent.futures.as_completed(futures):
            src, arch = futures[fut]
            part = fut.result()
            rows += part
            if progress:
                errs = [r for r in part if "error" in r]
                progress(f"  {src.name:<22} {arch:<7} {len(part)} kernels in {part[0]['compile_s']} s"
                         + (f"  ERROR {errs[0]['error'][:300]}" if errs else ""))
        if bind_future is not None:
            bindings = bind_future.result()
            if progress:
                progress(f"  bindings.cpp  syntax check {'ok' if 'error' not in bindings else 'FAILED'} "
                         f"in {bindings.get('compile_s', '?')} s" + (f": {bindings['error'][:300]}"
                                                                     if "error" in bindings else ""))
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["config"], r["arch"]))
    result = {"meta": meta(archs, time.perf_counter() - t0), "rows": rows, "bindings": bindings,
              "checks": checks(rows, bindings)}
    return result


def meta(archs, seconds) -> dict:
    nvcc = find_nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([\d.]+)", version)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nvcc": m.group(1) if m else None,
            "cuobjdump": compile_report.find_tool("cuobjdump"), "archs": list(archs),
            "nvcc_flags": [f for f in build.NVCC_FLAGS if f != "-lineinfo"], "cpus": os.cpu_count(),
            "wall_s": round(seconds, 1)}


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " | error |"
    sep = "|" + "|".join("---" for _ in range(len(COLUMNS) + 1)) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + f" | {r.get('error', '')} |" for r in rows]
    return "\n".join([head, sep, *body])


def format_checks(result: dict) -> str:
    return "\n".join(f"- [{'x' if c['ok'] else ' '}] {c['check']}"
                     + ("" if c["ok"] else f" -- failing: {', '.join(c['failing'])}") for c in result["checks"])


def write(result: dict, out_dir) -> tuple[Path, Path]:
    """csrc_report.json / .md in out_dir, each written to a temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = result["meta"]
    b = result.get("bindings")
    md = [
        "# CUDA C++ kernels (csrc/): offline compile report",
        "",
        (f"{m['date']}; nvcc {m['nvcc']} ({' '.join(m['nvcc_flags'])}), {', '.join(m['archs'])}; "
         f"{m['wall_s']} s on {m['cpus']} CPUs. cuobjdump `-res-usage` / `-sass` per kernel instance."),
        ("spill_bytes = STACK + LOCAL (cuobjdump) + ptxas spill stores / loads; smem_bytes = static shared memory "
         "(the kernels take theirs dynamically); hmma_in_loop = HMMA inside a backward branch; ldg128 / stg128 / "
         "ldgsts128 = 16-byte global loads / stores / cp.async; warpsync = convergence code."),
        "",
        "## Checks",
        "",
        format_checks(result),
        "",
        "## Kernels",
        "",
        format_table(result["rows"]),
        "",
    ]
    if b is not None:
        md += ["## Binding", "", f"`g++ -fsyntax-only csrc/bindings.cpp` against torch {b.get('torch', '?')}: "
               + ("ok" if "error" not in b else f"FAILED: {b['error']}") + f" ({b.get('compile_s', '?')} s)", ""]
    sys.path.insert(0, str(ROOT))
    from duodiff_fast import _io
    paths = []
    for name, text in (("csrc_report.json", json.dumps(result, indent=2) + "\n"), ("csrc_report.md", "\n".join(md))):
        paths.append(Path(_io.write_text(out / name, text)))
    return paths[0], paths[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for csrc_report.json / .md")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, e.g. sm_80,sm_90a")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all CPUs)")
    p.add_argument("--no-bindings", action="store_true", help="skip the g++ syntax check of bindings.cpp")
    args = p.parse_args(argv)
    try:
        result = run(archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()), jobs=args.jobs,
                     with_bindings=not args.no_bindings)
    except FileNotFoundError as e:
        print(f"csrc report: {e}", file=sys.stderr)
        return 2
    jpath, mpath = write(result, args.out)
    print(format_checks(result))
    print(f"wrote {jpath} and {mpath} ({result['meta']['wall_s']} s)")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile report: every kernel candidate compiled for sm_90a and sm_80, no GPU needed.

What is compiled: the `aot_specs()` of each module in `kernels/` (attention: every candidate config of
every head dim, fp16 and bf16; the norm family and exit confidence: their launch configs at the shipped
widths), each as `triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
arch, 32), options=dict(num_warps, num_stages))`.

What is read from each cubin, with the cuobjdump that ships in Triton's NVIDIA backend:
- `cuobjdump -res-usage`: REG, STACK, SHARED (static), LOCAL. Stack + local bytes are the spill figure
  (Triton kernels use no local arrays, so any local memory is register spill);
- `cuobjdump -sass`: HGMMA (Hopper warpgroup MMA, sm_90a only), HMMA (mma.sync), WARPGROUP.DEPBAR (a
  wait for outstanding wgmma), LDL/STL (local memory), and global loads / stores by width
  (LDG/STG .128 = 16-byte vectors, anything narrower counted apart);
- the ptxas log of that very compile (`TRITON_DUMP_PTXAS_LOG=1`): warning C7515, "wgmma.mma_async
  instructions are serialized due to non wgmma instructions defining accumulator registers", and C7511,
  the same "due to insufficient register resources for the wgmma pipeline".
A row is `serialized` when ptxas says so or the SASS waits after every HGMMA (DEPBAR >= HGMMA, with at
least two HGMMA): the tensor cores then run one instruction at a time. Only some ptxas releases print
C7515 (the 13.x `ptxas-blackwell` Triton 3.9 uses for sm_90 does; the 12.8 bundled with Triton 3.6 and
nvcc 13.0's do not), so the SASS count is the check that holds everywhere.

Triton versions: rows for this process's Triton and, with `--triton 3.6` (the GPU machine's version), for
Triton 3.6 installed on demand into a side virtual environment (`~/.cache/duodiff-fast/triton-3.6`,
`--system-site-packages` so it reuses this torch; `DUODIFF_TRITON36_VENV` overrides the path). Where it
cannot be installed the report says why and has no 3.6 rows. Every compile runs in a child process of
the chosen interpreter (`--jobs` of them), with Triton's cache bypassed so that ptxas really runs and its
log is there; each row names the Triton and ptxas versions and carries a `spec_key` (hash of the kernel
sources and the spec), so a test can tell whether a committed report still describes the code.

    python bench/kernels.py --compile-report [--triton 3.6] [--jobs 2] [--out DIR]
    python bench/compile_report.py --triton local 3.6 --jobs 2 --out bench/results
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
LEGACY_DIR = ROOT / "bench" / "legacy"


def registry_kernel_modules() -> tuple:
    """The Triton kernel modules of the op registry (each Triton implementation's KERNEL_MODULE in
    duodiff_fast/ops/backends/triton.py): the report compiles exactly what the ops can launch."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import duodiff_fast.ops  # noqa: F401  (registers the backends)
    from duodiff_fast.ops._registry import kernel_modules
    return tuple(kernel_modules())


KERNEL_MODULES = registry_kernel_modules()
# Modules compiled only when named (--kernels attention_v0): the pre-fix attention kernel, for before /
# after tables. It is serialized by design, so it is not part of the default report or its test.
OPTIONAL_MODULES = ("attention_v0",)
ARCHS = {"sm_90a": 90, "sm_80": 80}  # Triton emits sm_90a for capability 90 (wgmma needs the 'a' target)
COLUMNS = ("kernel", "config", "arch", "regs", "spill_bytes", "smem_bytes", "hgmma", "depbar", "serialized",
           "hmma", "ldg128", "ldg_narrow", "stg128", "stg_narrow", "num_warps", "num_stages", "compile_s")
TRITON_SIDE_VERSION = "3.6.0"
VENV_ENV = "DUODIFF_TRITON36_VENV"


def side_venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "duodiff-fast" / "triton-3.6")


# --------------------------------------------------------------------------------------------------
# Tools and SASS parsing
# --------------------------------------------------------------------------------------------------

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


def ptxas_for(arch: int) -> tuple[str | None, str | None]:
    """(path, version) of the ptxas this Triton runs for `arch` (3.9: ptxas-blackwell from sm_90 up;
    3.6: the plain ptxas below sm_100)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError):
        path = find_tool("ptxas")
    if not path:
        return None, None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+\.\d+), V([\d.]+)", out)
    return path, (m.group(2) if m else out.strip().splitlines()[-1:])


_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")


def _width(mods: list[str]) -> int:
    """Access width in bits from LDG/STG modifiers (.128, .64, .U16, ...; none means 32)."""
    for m in mods:
        if m in ("128", "64"):
            return int(m)
        if m in ("U8", "S8"):
            return 8
        if m in ("U16", "S16"):
            return 16
    return 32


def sass_counts(sass: str) -> dict:
    """Instruction counts from `cuobjdump -sass` text (opcode field only: HFMA2.MMA is not an HMMA)."""
    counts = {"hgmma": 0, "hmma": 0, "depbar": 0, "local_ld_st": 0, "ldg128": 0, "ldg_narrow": 0,
              "stg128": 0, "stg_narrow": 0, "sass_instructions": 0}
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op, mods = m.group(1), m.group(2).split(".")[1:]
        counts["sass_instructions"] += 1
        if op == "HGMMA":
            counts["hgmma"] += 1
        elif op == "HMMA":
            counts["hmma"] += 1
        elif op == "WARPGROUP" and mods[:1] == ["DEPBAR"]:
            counts["depbar"] += 1
        elif op in ("LDL", "STL"):
            counts["local_ld_st"] += 1
        elif op in ("LDG", "STG"):
            key = op.lower() + ("128" if _width(mods) == 128 else "_narrow")
            counts[key] += 1
    return counts


def res_usage(text: str) -> dict:
    """REG/STACK/SHARED/LOCAL of the (first) function in `cuobjdump -res-usage` output."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack_bytes": stack, "static_smem_bytes": shared, "local_bytes": local}


def ptxas_warnings(log: str) -> list[str]:
    """The C-numbered diagnostics of a ptxas -v log (C7515 serialization, spill warnings, ...)."""
    return sorted({m.group(0).strip() for m in re.finditer(r"\((C\d{4})\)[^\n]*", log)})


def is_serialized(hgmma: int, depbar: int, warnings: list[str]) -> bool:
    """ptxas said so (C7515: accumulator defined by non-wgmma instructions; C7511: not enough registers
    for the wgmma pipeline; any other "wgmma ... serialized" diagnostic), or the SASS waits after every
    HGMMA."""
    said = any(w.startswith(("(C7515)", "(C7511)")) or "serialized" in w for w in warnings)
    return said or (hgmma >= 2 and depbar >= hgmma)


def analyse_cubin(cubin: bytes) -> dict:
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = (subprocess.run([cuobjdump, flag, path], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    return {**res_usage(usage), **sass_counts(sass)}


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------

def load_kernel_module(name: str):
    """kernels/<name>.py of this tree, loaded by path (no dependence on how duodiff_fast is installed)."""
    modname = f"duodiff_fast_aot_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    folder = LEGACY_DIR if name in OPTIONAL_MODULES else KERNEL_DIR
    spec = importlib.util.spec_from_file_location(modname, folder / f"{name}.py")
    if spec is None:
        raise ValueError(f"no kernel module kernels/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def _jit_sources(mod) -> str:
    from triton.runtime.jit import JITFunction

    return "\n".join(obj.src if hasattr(obj, "src") else inspect.getsource(obj.fn)
                     for _, obj in sorted(vars(mod).items()) if isinstance(obj, JITFunction))


def spec_key(spec: dict, sources: str) -> str:
    """Hash of what decides the compiled code: every @triton.jit source of the module and the spec."""
    parts = [sources, repr(sorted(spec["signature"].items())), repr(sorted(spec["constexprs"].items())),
             repr(sorted((k, v) for k, v in (spec.get("attrs") or {}).items())),
             str(spec["num_warps"]), str(spec["num_stages"])]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


_DTYPES = ("bf16", "fp16", "fp32")


def collect_specs(kernels=None, max_configs=None, dtypes=None) -> list[dict]:
    """aot_specs() of every kernel module (or those named in `kernels`; 'norm' selects all norm.*,
    'attention_v0' the old attention kernel), at most `max_configs` per kernel name, only the `dtypes`
    given (configs name their dtype first; specs without one are always kept). Each spec gets its
    `spec_key`."""
    names = [m for m in KERNEL_MODULES + OPTIONAL_MODULES
             if (m in KERNEL_MODULES and not kernels) or (kernels and any(k == m or k.startswith(m + ".")
                                                                         for k in kernels))]
    specs, seen = [], {}
    for name in names:
        mod = load_kernel_module(name)
        sources = _jit_sources(mod)
        for spec in mod.aot_specs():
            kname = spec["kernel"]
            if kernels and not any(kname == k or kname.startswith(k + ".") for k in kernels):
                continue
            first = spec["config"].split()[0].split("/")[0]
            if dtypes and first in _DTYPES and first not in dtypes:
                continue
            seen[kname] = seen.get(kname, 0) + 1
            if max_configs is None or seen[kname] <= max_configs:
                spec["spec_key"] = spec_key(spec, sources)
                specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------------
# Compiling (in a worker process)
# --------------------------------------------------------------------------------------------------

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


def compile_spec(spec: dict, arch_name: str, ptxas_version: str | None = None) -> dict:
    """One row of the report (an `error` field instead of figures when compilation fails). Needs
    TRITON_ALWAYS_COMPILE=1 and TRITON_DUMP_PTXAS_LOG=1 in the environment for the ptxas warnings."""
    import triton
    from triton.runtime.jit import JITFunction

    row = {"kernel": spec["kernel"], "config": spec["config"], "arch": arch_name,
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "spec_key": spec.get("spec_key"),
           "triton": triton.__version__, "ptxas": ptxas_version}
    if not isinstance(spec["fn"], JITFunction):
        raise TypeError("kernels were imported with TRITON_INTERPRET=1 (interpreted functions cannot be "
                        "compiled); run the compile report in a process without it")
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src, note = _ast_source(spec)
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log (TRITON_DUMP_PTXAS_LOG)
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
    row["ptxas_log_seen"] = "Compiling entry function" in log.getvalue() or "Used " in log.getvalue()
    row["ptxas_warnings"] = ptxas_warnings(log.getvalue())
    row["serialized"] = is_serialized(fig["hgmma"], fig["depbar"], row["ptxas_warnings"])
    return row


def worker(kernels, archs, max_configs, shard: int, n_shards: int, dtypes=None, rows_out=None) -> None:
    """Compile this process's share of the specs (spec i goes to shard i % n_shards), appending each row
    as one JSON line to `rows_out` as soon as it exists; rows already there (same spec_key, arch and
    Triton) are not compiled again, so an interrupted report resumes where it stopped."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the compile report needs real @triton.jit functions")
    specs = collect_specs(kernels, max_configs, dtypes)
    versions = {a: ptxas_for(ARCHS[a])[1] for a in archs}
    prefix = Path(rows_out).name.rsplit("_", 1)[0]  # rows_<tag>: any earlier --jobs split of this Triton
    done = {(r["spec_key"], r["arch"], r["triton"]) for p in Path(rows_out).parent.glob(f"{prefix}_*.jsonl")
            for r in read_rows(p)}
    with open(rows_out, "a") as f:
        for i, spec in enumerate(specs):
            if i % n_shards != shard:
                continue
            for arch in archs:
                if (spec["spec_key"], arch, triton.__version__) in done:
                    continue
                row = compile_spec(spec, arch, versions[arch])
                f.write(json.dumps(row) + "\n")
                f.flush()
                tail = f"  ERROR {row['error']}" if "error" in row else f"  ({row.get('compile_s', 0)} s)"
                print(f"  [{row['triton']}] {row['kernel']:<22} {arch:<7} {row['config']}{tail}", file=sys.stderr,
                      flush=True)


def read_rows(path) -> list[dict]:
    """Rows of a worker's JSON-lines file (none when it does not exist; a torn last line is dropped)."""
    rows = []
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# --------------------------------------------------------------------------------------------------
# Driving workers for each Triton version
# --------------------------------------------------------------------------------------------------

def ensure_side_triton(version: str = TRITON_SIDE_VERSION, progress=print) -> tuple[str | None, str]:
    """(python of a venv with triton==version, note). Creates the venv on first use: `python -m venv
    --system-site-packages` (torch and numpy come from this interpreter) plus `pip install --no-deps
    triton==version` from the package registry. Returns (None, why) when that is not possible."""
    venv = side_venv_path()
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import triton; print(triton.__version__)"]
    if py.exists():
        got = subprocess.run(probe, capture_output=True, text=True, check=False).stdout.strip()
        if got == version:
            return str(py), f"triton {version} from {venv}"
    progress(f"installing triton=={version} into {venv} (once) ...")
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                       capture_output=True, text=True, timeout=600)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", f"triton=={version}"],
                       check=True, capture_output=True, text=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return None, (f"triton {version} could not be installed into {venv}: "
                      f"{str(detail).strip().splitlines()[-1] if str(detail).strip() else e}")
    got = subprocess.run(probe, capture_output=True, text=True, check=False)
    if got.stdout.strip() != version:
        return None, f"the venv at {venv} does not import triton {version}: {got.stderr.strip()[-300:]}"
    return str(py), f"triton {version} from {venv}"


def _run_workers(python: str, kernels, archs, max_configs, jobs: int, progress, dtypes=None,
                 work_dir=None) -> list[dict]:
    """Rows of every spec x arch for the Triton of `python`, compiled by `jobs` worker processes. With a
    `work_dir` the workers' JSON-lines files persist there and a rerun resumes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    with contextlib.ExitStack() as stack:
        d = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        d.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(python.encode()).hexdigest()[:8]
        procs = []
        for k in range(jobs):
            out = d / f"rows_{tag}_{k}of{jobs}.jsonl"
            cmd = [python, str(Path(__file__).resolve()), "--worker", f"{k}/{jobs}", "--rows-out", str(out),
                   "--arch", *archs]
            if kernels:
                cmd += ["--kernels", *kernels]
            if max_configs is not None:
                cmd += ["--max-configs", str(max_configs)]
            if dtypes:
                cmd += ["--only-dtype", *dtypes]
            procs.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), out))
        failures = []

        def pump(proc):  # one reader per worker, so no worker blocks on a full stderr pipe
            for line in proc.stderr:
                if progress and line.startswith("  ["):
                    progress(line.rstrip())
                elif line.strip():
                    failures.append(line.rstrip())

        readers = [threading.Thread(target=pump, args=(proc,), daemon=True) for proc, _ in procs]
        for t in readers:
            t.start()
        for (proc, _), t in zip(procs, readers):
            code = proc.wait()
            t.join()
            if code != 0:
                raise RuntimeError(f"compile worker {' '.join(proc.args[2:5])} failed:\n" + "\n".join(failures[-30:]))
        rows = {}
        for path in sorted(d.glob(f"rows_{tag}_*.jsonl")):
            for r in read_rows(path):
                rows[(r["spec_key"], r["arch"], r["triton"])] = r
    wanted = {s["spec_key"] for s in collect_specs(kernels, max_configs, dtypes)}
    return [r for r in rows.values() if r["spec_key"] in wanted and r["arch"] in archs]


def run(kernels=None, archs=tuple(ARCHS), max_configs=None, tritons=("local",), jobs=1,
        progress=print, dtypes=None, work_dir=None) -> tuple[list[dict], list[str]]:
    """(rows, notes): every spec compiled for every arch, once per Triton in `tritons` ('local' is this
    interpreter's; '3.6' the side venv's, installed on demand)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the compile report needs real @triton.jit functions")
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(f"compile report needs {', '.join(missing)} "
                                "(shipped with triton's NVIDIA backend)")
    if not collect_specs(kernels, max_configs, dtypes):
        raise ValueError(f"no aot_specs() matched kernels={kernels} dtypes={dtypes}")
    rows, notes = [], []
    for which in tritons:
        if which == "local":
            python = sys.executable
        elif which in ("3.6", TRITON_SIDE_VERSION):
            import triton

            if triton.__version__ == TRITON_SIDE_VERSION and "local" in tritons:
                continue  # this interpreter's Triton is 3.6 already (the GPU machine)
            python, note = ensure_side_triton(TRITON_SIDE_VERSION, progress or (lambda s: None))
            notes.append(note if python else f"Triton {TRITON_SIDE_VERSION} rows skipped: {note}")
            if python is None:
                continue
        else:
            raise ValueError(f"tritons: {which!r} is not 'local' or '3.6'")
        rows += _run_workers(python, kernels, archs, max_configs, max(1, jobs), progress, dtypes, work_dir)
    return sort_rows(rows), notes


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def sort_rows(rows: list[dict]) -> list[dict]:
    """Rows in spec order (as `collect_specs` lists them), then arch, then Triton version; rows of
    specs that no longer exist go last."""
    order = {}
    try:
        for i, s in enumerate(collect_specs(sorted({r["kernel"].split(".")[0] for r in rows}))):
            order.setdefault(s["spec_key"], i)
    except (ImportError, RuntimeError, ValueError):
        pass  # e.g. under TRITON_INTERPRET=1: keep the given order
    arch = {a: i for i, a in enumerate(ARCHS)}
    return sorted(rows, key=lambda r: (order.get(r.get("spec_key"), len(order)), arch.get(r["arch"], 9),
                                       str(r.get("triton"))))


def _cell(r, c):
    v = r.get(c, "")
    if c == "serialized" and v != "":
        return "**YES**" if v else "no"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """Markdown table (also printed)."""
    head = "| triton | " + " | ".join(COLUMNS) + " | ptxas warnings / error |"
    sep = "|" + "|".join("---" for _ in range(len(COLUMNS) + 2)) + "|"
    body = ["| " + str(r.get("triton", "")) + " | " + " | ".join(_cell(r, c) for c in COLUMNS)
            + f" | {r.get('error', '') or ' '.join(w.split(')')[0] + ')' for w in r.get('ptxas_warnings', []))} |"
            for r in rows]
    return "\n".join([head, sep, *body])


def summary(rows: list[dict]) -> list[str]:
    """One line per (triton, arch, kernel family): candidates, spilling, serialized, errors."""
    groups = {}
    for r in rows:
        fam = r["kernel"].split(".")[0]
        groups.setdefault((r.get("triton"), r["arch"], fam), []).append(r)
    lines = ["| triton | arch | kernel | candidates | spilling | serialized | errors | max regs |",
             "|---|---|---|---|---|---|---|---|"]
    for (tv, arch, fam), g in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ok = [r for r in g if "error" not in r]
        lines.append(f"| {tv} | {arch} | {fam} | {len(g)} | {sum(r['spill_bytes'] > 0 for r in ok)} | "
                     f"{sum(bool(r.get('serialized')) for r in ok)} | {len(g) - len(ok)} | "
                     f"{max((r['regs'] for r in ok), default='-')} |")
    return lines


def compare_table(before: list[dict], after: list[dict]) -> str:
    """Markdown: each candidate of `after` beside the row of `before` with the same config, arch and
    Triton (e.g. attention_v0 vs attention): HGMMA, WARPGROUP.DEPBAR, serialized, registers."""
    old = {(r["config"], r["arch"], r.get("triton")): r for r in before if "error" not in r}
    lines = [("| triton | arch | config | HGMMA before / after | DEPBAR before / after | serialized before / after "
              "| C7515 before / after | regs before / after |"), "|---|---|---|---|---|---|---|---|"]
    for r in after:
        b = old.get((r["config"], r["arch"], r.get("triton")))
        if b is None or "error" in r:
            continue

        def c7515(x):
            return "yes" if any(w.startswith("(C7515)") for w in x.get("ptxas_warnings", [])) else "no"
        lines.append(f"| {r.get('triton')} | {r['arch']} | {r['config']} | {b['hgmma']} / {r['hgmma']} | "
                     f"{b['depbar']} / {r['depbar']} | {'YES' if b['serialized'] else 'no'} / "
                     f"{'YES' if r['serialized'] else 'no'} | {c7515(b)} / {c7515(r)} | {b['regs']} / {r['regs']} |")
    return "\n".join(lines)


def meta(rows, notes) -> dict:
    import triton

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "tritons": sorted({r.get("triton") for r in rows if r.get("triton")}),
            "ptxas": sorted({f"{r['triton']}/{r['arch']}: {r['ptxas']}" for r in rows if r.get("ptxas")}),
            "local_triton": triton.__version__, "archs": list(ARCHS), "notes": list(notes)}


def write(rows: list[dict], out_dir, notes=()) -> tuple[Path, Path]:
    """compile_report.json and .md in `out_dir`, each written to a temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = meta(rows, notes)
    for r in rows:
        r.setdefault("date", m["date"])
    jpath, mpath = out / "compile_report.json", out / "compile_report.md"
    text = [
        "# Ahead-of-time compile report",
        "",
        f"{m['date']}; Triton {', '.join(m['tritons'])}; ptxas per Triton and arch: {'; '.join(m['ptxas'])}.",
        "Generated by `python bench/compile_report.py` (see its docstring); no GPU involved.",
        *(f"Note: {n}" for n in notes),
        "",
        "spill_bytes = STACK + LOCAL from `cuobjdump -res-usage`; smem_bytes = max(static SHARED, Triton's",
        "dynamic shared memory); hgmma / depbar / hmma = SASS counts of HGMMA, WARPGROUP.DEPBAR, HMMA;",
        "ldg128 / stg128 = 16-byte global loads / stores, ldg_narrow / stg_narrow = narrower ones;",
        "serialized = ptxas warning C7515 / C7511 (wgmma serialized) or one DEPBAR per HGMMA;",
        "compile_s = wall time of triton.compile (on a shared, often loaded 2-core machine: a rough figure).",
        "",
        "## Summary",
        "",
        *summary(rows),
        "",
        "## Every candidate",
        "",
        format_table(rows),
        "",
    ]
    for path, content in ((jpath, json.dumps({"meta": m, "rows": rows}, indent=1) + "\n"),
                          (mpath, "\n".join(text))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
    return jpath, mpath


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Ahead-of-time compile report (sm_90a, sm_80; no GPU)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--kernels", nargs="*", default=None,
                   help="kernel names or families (attention, norm, exit_confidence, attention_v0)")
    p.add_argument("--max-configs", type=int, default=None, help="first N specs per kernel")
    p.add_argument("--only-dtype", nargs="*", default=None, choices=_DTYPES, help="only specs of these dtypes")
    p.add_argument("--arch", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--triton", nargs="*", default=["local", "3.6"],
                   help="'local' (this Triton) and/or '3.6' (installed once into a side venv); default both")
    p.add_argument("--jobs", type=int, default=1, help="compile processes per Triton version")
    p.add_argument("--list-specs", action="store_true",
                   help="print the specs (kernel, config, spec_key) as JSON and exit; compiles nothing")
    p.add_argument("--add-rows", nargs="*", default=[],
                   help="compile_report.json files whose rows are added (e.g. another --arch or --triton run)")
    p.add_argument("--work-dir", default=None,
                   help="keep the workers' rows here (JSON lines) and resume from them on a rerun")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"), default=None,
                   help="write a before / after table of two reports (e.g. attention_v0 vs attention) to --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "k/n": compile shard k of n
    p.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list_specs:
        print(json.dumps([{"kernel": s["kernel"], "config": s["config"], "spec_key": s["spec_key"]}
                          for s in collect_specs(args.kernels, args.max_configs, args.only_dtype)]))
        return 0
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        out = Path(args.out) / "compile_report_attention_before_after.md"
        dtypes = {r["config"].split()[0] for r in before["rows"]}
        after_rows = [r for r in after["rows"] if r["kernel"] == "attention" and r["arch"] == "sm_90a"
                      and r["config"].split()[0] in dtypes]
        counts = []
        for tv in sorted({r["triton"] for r in before["rows"]}):
            b = [r for r in before["rows"] if r["triton"] == tv and r["arch"] == "sm_90a" and "error" not in r]
            a = [r for r in after_rows if r["triton"] == tv and "error" not in r]
            counts.append(f"Triton {tv}: before {sum(bool(r['serialized']) for r in b)} of {len(b)} serialized "
                          f"({sum(r['spill_bytes'] > 0 for r in b)} spilling), after {sum(bool(r['serialized']) for r in a)} "
                          f"of {len(a)} ({sum(r['spill_bytes'] > 0 for r in a)} spilling)")
        text = ["# Attention on sm_90a before and after the issue-9 fix", "",
                ("Before: `bench/legacy/attention_v0.py` (a masked tail-key loop after the wgmma main loop; its "
                 "candidate list still had 128x128 tiles with 4 warps and D=128 128x64 tiles with 4 warps); after: "
                 "`kernels/attention.py` (one guarded masked block; those candidates removed). " + "; ".join(counts)
                 + f". Tails of L=257 (16 x 16). Generated {before['meta']['date']} / {after['meta']['date']} by "
                 "`bench/compile_report.py --compare`; rows of candidates present in both."), "",
                compare_table(before["rows"], after_rows), ""]
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(text))
        tmp.replace(out)  # atomic, like every results file
        print(f"wrote {out}")
        return 0
    if args.worker:
        k, n = map(int, args.worker.split("/"))
        worker(args.kernels, args.arch, args.max_configs, k, n, args.only_dtype, args.rows_out)
        return 0
    rows, notes = run(args.kernels, tuple(args.arch), args.max_configs, tuple(args.triton), args.jobs,
                      dtypes=args.only_dtype, work_dir=args.work_dir) if args.arch and args.triton else ([], [])
    for path in args.add_rows:
        other = json.loads(Path(path).read_text())
        rows += other["rows"]
        notes += [n for n in other["meta"].get("notes", []) if n not in notes]
    if args.add_rows:  # keep one row per (spec, arch, Triton), and only specs the kernels still have
        current = {s["spec_key"] for s in collect_specs(sorted({r["kernel"].split(".")[0] for r in rows}))}
        rows = list({(r["spec_key"], r["arch"], r["triton"]): r for r in rows if r.get("spec_key") in current}.values())
    jpath, mpath = write(sort_rows(rows), args.out, notes)
    print("\n".join(summary(rows)))
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {jpath} and {mpath}")
    bad = [r for r in rows if "error" in r or (r["arch"] == "sm_90a" and (r.get("serialized") or r.get("spill_bytes")))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

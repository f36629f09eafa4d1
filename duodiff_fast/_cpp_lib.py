"""The one place that finds the compiled CUDA extension `duodiff_fast._C`.

Nothing here runs at import time: the extension is looked up on first use (`get()`, `status()`,
`unavailable_reasons()`), once per process. Outcomes:

- not built (the normal state of a CPU install): `ExtensionNotBuiltError`, no warning;
- present but fails to import (an undefined symbol after a torch upgrade, a missing libcudart):
  `ExtensionLoadError`, with the import error, and one warning;
- imports but was built for another torch / CUDA than the one running: `ExtensionMismatchError`, one
  warning. An ABI mismatch must not be hidden: a wrong binary can crash or silently compute garbage.

Where it comes from (`status()["source"]`): built by `pip install -e . --no-build-isolation` ("setup.py",
imported as `duodiff_fast._C`), or, when that was not done, compiled on first use on a machine with a
CUDA torch, a visible GPU, nvcc, ninja and the csrc/ sources of a source checkout ("jit":
`torch.utils.cpp_extension.load`, cached under TORCH_EXTENSIONS_DIR, keyed by a hash of the sources,
flags, archs and torch version, so a second process reuses it). `DUODIFF_SKIP_CUDA_BUILD=1` turns the
JIT build off; a failed build is an `ExtensionBuildError` (one warning), never a crash.

Build settings shared by setup.py, the JIT build and bench/csrc_report.py: `NVCC_FLAGS`, `CXX_FLAGS`,
`gencode_flags()`, `build_macros()` (this module imports only the standard library at import time, so
setup.py loads it by path without importing the package).

Contract for the extension (csrc/bindings.cpp):
- `_C.build_info()` -> dict with "torch" (torch.__version__ it was built with), "cuda"
  (torch.version.cuda at build time) and "archs" (the DUODIFF_CUDA_ARCHS string, e.g. "80;90a");
- one function per op, launching on the current stream and writing into the given outputs:
  `attention(qkv, scale, out)`, `norm(x, weight, bias, update, gate, shift, scale, eps, out,
  residual_out)`, `exit_confidence(h, weight, bias, start, out)`; missing ones are reported by
  `missing_ops()` and the dispatcher does not pick the cuda backend for them. Plain pybind functions,
  not TORCH_LIBRARY ops: the `duodiff::` op names belong to `duodiff_fast.ops`, which registers them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path

MODULE = "duodiff_fast._C"
BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` on a machine with a CUDA torch and "
              "nvcc (DUODIFF_CUDA_ARCHS, default '80;90a', picks the archs), or let the first use on a GPU "
              "machine JIT-build it (needs nvcc and ninja; DUODIFF_SKIP_CUDA_BUILD=1 turns that off)")


class ExtensionError(ImportError):
    """Base class: `duodiff_fast._C` cannot be used."""


class ExtensionNotBuiltError(ExtensionError):
    """The extension was never built (no CUDA toolchain at install time, or a CPU torch)."""


class ExtensionLoadError(ExtensionError):
    """The extension exists but importing it failed (usually an ABI mismatch with torch)."""


class ExtensionMismatchError(ExtensionError):
    """The extension imported but was built for a different torch / CUDA than the one running."""


class ExtensionBuildError(ExtensionNotBuiltError):
    """Not built by setup.py, and the JIT build on first use failed (compiler error, missing tool)."""


# --------------------------------------------------------------------------------------------------
# Build settings (setup.py, the JIT build and bench/csrc_report.py use these, so all three agree)
# --------------------------------------------------------------------------------------------------

ENV_ARCHS = "DUODIFF_CUDA_ARCHS"
ENV_SKIP = "DUODIFF_SKIP_CUDA_BUILD"
ENV_FORCE = "DUODIFF_FORCE_CUDA_BUILD"
DEFAULT_ARCHS = "80;90a"
CSRC = Path(__file__).resolve().parent.parent / "csrc"  # present in a source checkout / editable install
SOURCES = ("attention.cu", "norm.cu", "exit_confidence.cu", "bindings.cpp")
CXX_FLAGS = ["-O3", "-std=c++17"]
# --use_fast_math: ex2.approx / rsqrt.approx in the kernels; -Xptxas=--warn-on-spills makes a spill a
# build warning (the offline check fails on any).
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=--warn-on-spills", "-lineinfo"]


def env_flag(name: str, env=None) -> bool:
    env = os.environ if env is None else env
    return env.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def gencode_flags(archs: str | None) -> list[str]:
    """'80;90a' -> ['-gencode', 'arch=compute_80,code=sm_80', '-gencode', 'arch=compute_90a,code=sm_90a']."""
    out = []
    for a in parse_archs(archs):
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def build_macros(archs: str, torch_version: str, torch_cuda: str | None) -> list[tuple[str, str]]:
    """-D macros for csrc/bindings.cpp's build_info(). Values are bare tokens the binding stringifies
    (no quotes or semicolons: they go through a shell in the ninja build), archs comma-separated."""
    return [("DUODIFF_CUDA_ARCHS_RAW", ",".join(parse_archs(archs))),
            ("DUODIFF_TORCH_VERSION_RAW", torch_version),
            ("DUODIFF_TORCH_CUDA_RAW", torch_cuda or "none")]


def source_paths(csrc: Path = CSRC) -> list[Path]:
    return [csrc / s for s in SOURCES]


def device_arch(major: int, minor: int) -> str:
    """The arch string to compile for a device: 'a' targets for sm_90 (Hopper-only features)."""
    return f"{major}{minor}" + ("a" if major == 9 else "")


_lock = threading.Lock()
_state: dict | None = None  # filled once by _load()
_warned = False


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"duodiff_fast: the CUDA extension is unusable, falling back: {msg}", RuntimeWarning,
                      stacklevel=3)


def _running() -> dict:
    import torch

    run = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch": None}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        run["arch"] = f"{major}{minor}"
    return run


def _base_version(v: str | None) -> str | None:
    # "2.5.1+cu124" and "2.5.1" are the same ABI; the local suffix only names the wheel variant.
    return None if v is None else v.split("+")[0]


def parse_archs(archs: str | None) -> list[str]:
    """'80;90a' / '8.0 9.0a' / '80,90' -> ['80', '90a']."""
    if not archs:
        return []
    out = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip().replace(".", "").replace("sm_", "")
        if a:
            out.append(a)
    return out


def _compare(build: dict, run: dict) -> list[str]:
    mismatches = []
    if build.get("torch") and _base_version(build["torch"]) != _base_version(run["torch"]):
        mismatches.append(f"built for torch {build['torch']}, running torch {run['torch']}")
    if build.get("cuda") and run["cuda"] and build["cuda"].split(".")[0] != run["cuda"].split(".")[0]:
        mismatches.append(f"built for CUDA {build['cuda']}, running CUDA {run['cuda']}")
    return mismatches


# --------------------------------------------------------------------------------------------------
# JIT build on first use
# --------------------------------------------------------------------------------------------------

def jit_plan(env=None, csrc: Path = CSRC) -> tuple[bool, str, str | None]:
    """(build?, why, archs) for a JIT build here. Imports torch (already imported by every caller)."""
    env = os.environ if env is None else env
    if env_flag(ENV_SKIP, env):
        return False, f"{ENV_SKIP} is set", None
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build", None
    if not torch.cuda.is_available():
        return False, "no visible GPU", None
    missing = [p.name for p in source_paths(csrc) if not p.exists()]
    if missing:
        return False, f"the csrc/ sources are not next to the package ({csrc}): install from a source checkout", None
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found (set CUDA_HOME)", None
    if shutil.which("ninja") is None:
        return False, "ninja not found (pip install ninja)", None
    archs = env.get(ENV_ARCHS, "").strip()
    if not archs:
        major, minor = torch.cuda.get_device_capability()
        archs = device_arch(major, minor)  # only the running GPU: a JIT build should be quick
    return True, f"CUDA torch {torch.__version__}, nvcc and ninja found", archs


def jit_name(archs: str, torch_version: str, csrc: Path = CSRC) -> str:
    """Module name of a JIT build: a hash of everything that changes the binary, so a stale cache entry
    (edited sources, another torch, other archs) is never reused."""
    h = hashlib.sha256()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp") and "emu" not in p.parts:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(repr((NVCC_FLAGS, CXX_FLAGS, parse_archs(archs), torch_version)).encode())
    return f"duodiff_fast_C_{h.hexdigest()[:12]}"


def _jit_build(archs: str):
    import torch
    from torch.utils import cpp_extension

    defines = [f"-D{k}={v}" for k, v in build_macros(archs, torch.__version__, torch.version.cuda)]
    return cpp_extension.load(
        name=jit_name(archs, torch.__version__),
        sources=[str(p) for p in source_paths()],
        extra_cflags=CXX_FLAGS + defines,
        extra_cuda_cflags=NVCC_FLAGS + gencode_flags(archs),
        extra_include_paths=[str(CSRC)],
        verbose=env_flag("DUODIFF_VERBOSE_BUILD"),
    )


def _load() -> dict:
    global _state
    with _lock:
        if _state is not None:
            return _state
        st = {"module": None, "built": False, "error": None, "error_type": None, "build": {},
              "running": _running(), "mismatches": [], "path": None, "source": None, "jit": None}
        spec = importlib.util.find_spec(MODULE)
        if spec is None:
            st["error_type"] = ExtensionNotBuiltError
            st["error"] = "duodiff_fast._C is not built"
            build, why, archs = jit_plan()
            st["jit"] = {"attempted": build, "reason": why, "archs": archs}
            if build:
                try:
                    mod = _jit_build(archs)
                except Exception as e:  # noqa: BLE001 -- a failed build falls back, with its reason
                    st["error_type"] = ExtensionBuildError
                    msg = str(e).strip().splitlines()
                    st["error"] = f"duodiff_fast._C is not built and the JIT build failed: {type(e).__name__}: " + (
                        msg[-1] if msg else "")
                    _warn_once(st["error"] + " (DUODIFF_VERBOSE_BUILD=1 shows the compiler output)")
                else:
                    st.update(built=True, path=getattr(mod, "__file__", None), source="jit", error=None,
                              error_type=None)
                    st["build"] = dict(mod.build_info())
                    st["mismatches"] = _compare(st["build"], st["running"])
                    st["module"] = mod
        else:
            st["source"] = "setup.py"
            st["built"], st["path"] = True, spec.origin
            try:
                mod = importlib.import_module(MODULE)
            except (ImportError, OSError) as e:  # undefined symbol, missing libcudart, ...
                st["error_type"] = ExtensionLoadError
                st["error"] = f"importing {MODULE} from {spec.origin} failed: {e}"
                _warn_once(st["error"])
            else:
                build_info = getattr(mod, "build_info", None)
                st["build"] = dict(build_info()) if callable(build_info) else {}
                st["mismatches"] = _compare(st["build"], st["running"])
                if st["mismatches"]:
                    st["error_type"] = ExtensionMismatchError
                    st["error"] = f"{MODULE}: " + "; ".join(st["mismatches"])
                    _warn_once(st["error"] + " (rebuild it against the running torch)")
                else:
                    st["module"] = mod
        _state = st
        return st


def get():
    """The loaded `duodiff_fast._C` module; raises an `ExtensionError` subclass saying why not."""
    st = _load()
    if st["module"] is None:
        raise st["error_type"](st["error"])
    return st["module"]


def is_available() -> bool:
    return _load()["module"] is not None


def built_archs() -> list[str]:
    """Architectures the extension was compiled for (['80', '90a']); [] when unknown or not built."""
    return parse_archs(_load()["build"].get("archs"))


def contract() -> tuple[str, ...]:
    """The functions `_C` must export: one per `CPP_FUNCTION` of the cuda backend's implementations
    (derived from the op registry, `ops/backends/cuda.py`), plus `build_info`."""
    from .ops import _registry
    return tuple(_registry.cuda_functions())


def missing_ops() -> list[str]:
    mod = _load()["module"]
    return [] if mod is None else [f for f in contract() if not callable(getattr(mod, f, None))]


def arch_supported(major: int, minor: int) -> bool | None:
    """Whether the build has SASS for compute capability (major, minor); None when the build did not say.

    An arch-specific target like 90a runs only on exactly sm_90; plain 80 runs on 8.x devices of the
    same or higher minor version (binary compatibility within a major version).
    """
    archs = built_archs()
    if not archs:
        return None
    cc = major * 10 + minor
    for a in archs:
        num = int("".join(ch for ch in a if ch.isdigit()))
        if a.endswith("a"):
            if num == cc:
                return True
        elif num // 10 == major and num <= cc:
            return True
    return False


def unavailable_reasons() -> list[str]:
    """Why the cuda backend cannot run here at all ([] when the extension is loaded and matches)."""
    st = _load()
    return [] if st["module"] is not None else [st["error"]]


def status() -> dict:
    """Plain-data summary for `python -m duodiff_fast.info`."""
    st = _load()
    return {
        "module": MODULE,
        "built": st["built"],
        "loaded": st["module"] is not None,
        "path": st["path"],
        "error": st["error"],
        "build": dict(st["build"]),
        "archs": parse_archs(st["build"].get("archs")),
        "running": dict(st["running"]),
        "mismatches": list(st["mismatches"]),
        "missing_ops": missing_ops(),
        "source": st["source"],
        "jit": None if st["jit"] is None else dict(st["jit"]),
        "hint": None if st["module"] is not None else BUILD_HINT,
    }


def _reset_for_tests() -> None:
    global _state, _warned
    with _lock:
        _state, _warned = None, False

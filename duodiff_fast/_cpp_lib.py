"""The one place that finds the compiled CUDA extension `duodiff_fast._C`.

Nothing here runs at import time: the extension is looked up on first use (`get()`, `status()`,
`unavailable_reasons()`), once per process. Outcomes:

- not built (the normal state of a CPU install): `ExtensionNotBuiltError`, no warning;
- present but fails to import (an undefined symbol after a torch upgrade, a missing libcudart):
  `ExtensionLoadError`, with the import error, and one warning;
- imports but was built for another torch / CUDA than the one running: `ExtensionMismatchError`, one
  warning. An ABI mismatch must not be hidden: a wrong binary can crash or silently compute garbage.

Contract for the extension (csrc/ binding, added by a later issue):
- `_C.build_info()` -> dict with "torch" (torch.__version__ it was built with), "cuda"
  (torch.version.cuda at build time) and "archs" (the DUODIFF_CUDA_ARCHS string, e.g. "80;90a");
- one function per op, launching on the current stream and writing into the given outputs:
  `attention(qkv, scale, out)`, `norm(x, weight, bias, update, gate, shift, scale, eps, out,
  residual_out)`, `exit_confidence(h, weight, bias, start, out)`; missing ones are reported by
  `missing_ops()` and the dispatcher does not pick the cuda backend for them. Plain pybind functions,
  not TORCH_LIBRARY ops: the `duodiff::` op names belong to `duodiff_fast.ops`, which registers them.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings

MODULE = "duodiff_fast._C"
OP_FUNCTIONS = ("attention", "norm", "exit_confidence")
BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` on a machine with a CUDA torch and "
              "nvcc; DUODIFF_CUDA_ARCHS (default '80;90a') picks the archs")


class ExtensionError(ImportError):
    """Base class: `duodiff_fast._C` cannot be used."""


class ExtensionNotBuiltError(ExtensionError):
    """The extension was never built (no CUDA toolchain at install time, or a CPU torch)."""


class ExtensionLoadError(ExtensionError):
    """The extension exists but importing it failed (usually an ABI mismatch with torch)."""


class ExtensionMismatchError(ExtensionError):
    """The extension imported but was built for a different torch / CUDA than the one running."""


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


def _load() -> dict:
    global _state
    with _lock:
        if _state is not None:
            return _state
        st = {"module": None, "built": False, "error": None, "error_type": None, "build": {},
              "running": _running(), "mismatches": [], "path": None}
        spec = importlib.util.find_spec(MODULE)
        if spec is None:
            st["error_type"] = ExtensionNotBuiltError
            st["error"] = "duodiff_fast._C is not built"
        else:
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


def missing_ops() -> list[str]:
    mod = _load()["module"]
    return [] if mod is None else [f for f in OP_FUNCTIONS if not callable(getattr(mod, f, None))]


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
        "hint": None if st["module"] is not None else BUILD_HINT,
    }


def _reset_for_tests() -> None:
    global _state, _warned
    with _lock:
        _state, _warned = None, False

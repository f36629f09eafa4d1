"""Atomic file writes: every file a user relies on is written to a temporary file in the same folder,
flushed to disk, then renamed over the real name.

A reader (or a run killed half-way) therefore sees either the old file or the complete new one, never a
truncated mix: `os.replace` within one folder is atomic on POSIX and Windows. The temporary name is hidden
(leading dot), unique per process and call, and keeps the real extension at its end, so writers that
pick a format from the name (matplotlib's savefig, np.savez's ".npz") behave as for the real name. On any
error the temporary file is removed and the real file is left untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets

__all__ = ["atomic_path", "atomic_open", "write_text", "write_json", "write_bytes", "torch_save",
           "savez", "save_safetensors_dict", "savefig", "check_writable_dir"]


def _tmp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(base)[1]
    return os.path.join(folder, f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}")


def _fsync_dir(folder: str) -> None:
    # Make the rename itself durable where the platform allows opening a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is deleted."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """`open()` for writing, atomically: the real file appears only when the block ends without error."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes whole files: mode must contain 'w' or 'x', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()


def write_text(path, text: str) -> str:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path, obj, **kwargs) -> str:
    kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **kwargs) + "\n")


def write_bytes(path, data: bytes) -> str:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def torch_save(obj, path) -> str:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return os.fspath(path)


def savez(path, **arrays) -> str:
    """np.savez to exactly `path` (which should end in .npz), atomically."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return os.fspath(path)


def save_safetensors_dict(tensors: dict, path, metadata: dict | None = None) -> str:
    """safetensors file of `tensors` (contiguous CPU tensors) with string metadata, atomically."""
    from safetensors.torch import save

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return write_bytes(path, save(tensors, metadata=meta))


def savefig(fig, path, **kwargs) -> str:
    """matplotlib `fig.savefig` to `path`, atomically (the format comes from the real extension)."""
    fmt = kwargs.pop("format", None) or os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)
    return os.fspath(path)


def check_writable_dir(path, what: str = "--out") -> str:
    """Create `path` if needed and prove it writable (by writing and removing a probe file), so that a
    long job fails before it starts rather than after. Returns the path; raises OSError naming it."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}-{secrets.token_hex(4)}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path!r} is not writable: {e.strerror or e}") from None
    return path


def read_json_object(path, expected: str, error=ValueError) -> dict:
    """The JSON object in `path`; `error` (naming the path and `expected`) when it is missing, not JSON,
    or not an object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); expected {expected}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} holds a {type(obj).__name__}; expected {expected} (a JSON object)")
    return obj

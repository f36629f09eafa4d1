"""Backend dispatch for `duodiff_fast.ops` (the design of xformers' `fmha/dispatch.py`).

Each backend declares what it supports (ops, dtypes, head dims, minimum compute capability, whether it
runs on CPU or needs autograd) and answers `not_supported_reasons(inp) -> list[str]`. The priority list
(cuda, triton, torch) gives the first backend with no reasons. An automatic choice falls back quietly
to torch, which supports everything; a forced backend (`backend=` per call, or `DUODIFF_BACKEND`) that
cannot run raises a ValueError listing its reasons.

Selection depends only on tensor *metadata* (dtype, device, grad, last-dim contiguity, head dim) and on
the environment, so it is computed once per distinct signature (`functools.lru_cache`: the per-call cost
in eager is a tuple build and a dict lookup) and, under `torch.compile`, evaluated at trace time as a
constant (`torch.compiler.assume_constant_result`): the chosen backend is baked into the graph and
no probing code (imports, device queries) is traced.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import NamedTuple

import torch

OPS = ("attention", "layer_norm", "add_layer_norm", "adaln", "gated_adaln", "exit_confidence")
PRIORITY = ("cuda", "triton", "torch")
BACKEND_NAMES = PRIORITY + ("sdpa",)
ENV_VAR = "DUODIFF_BACKEND"

# The Triton module holding each op's launcher (kernels/<module>.py, imported as duodiff_fast.kernels.*).
KERNEL_MODULES = {
    "attention": ("attention", "attention_fwd"),
    "layer_norm": ("norm", "norm_fwd"),
    "add_layer_norm": ("norm", "norm_fwd"),
    "adaln": ("norm", "norm_fwd"),
    "gated_adaln": ("norm", "norm_fwd"),
    "exit_confidence": ("exit_confidence", "exit_confidence_fwd"),
}
# The `_C` function serving each op (see duodiff_fast/_cpp_lib.py for the contract).
CUDA_FUNCTIONS = {op: ("norm" if op in ("layer_norm", "add_layer_norm", "adaln", "gated_adaln") else op)
                  for op in OPS}
ATTENTION_HEAD_DIMS = frozenset({32, 48, 64, 72, 80, 96, 128})
FAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class TensorMeta(NamedTuple):
    """What dispatch may look at in one tensor argument (hashable, so selection can be cached)."""
    name: str
    dtype: torch.dtype
    device_type: str
    device_index: int  # -1 when the device has no index (cpu)
    requires_grad: bool
    last_dim_contiguous: bool


class OpInputs(NamedTuple):
    op: str
    tensors: tuple  # tuple[TensorMeta, ...], the op's first (main) tensor first
    head_dim: int | None  # attention only
    needs_grad: bool  # grad mode on and some input requires grad
    interpret: bool  # TRITON_INTERPRET=1


def _metas(names, tensors) -> tuple:
    """Plain-tuple TensorMeta fields of the tensors among `tensors` (the hot path avoids NamedTuples)."""
    out = []
    for name, t in zip(names, tensors):
        if isinstance(t, torch.Tensor):
            # is_cuda / get_device() avoid building a torch.device per tensor on the GPU hot path
            where = ("cuda", t.get_device()) if t.is_cuda else (t.device.type, -1)
            out.append((name, t.dtype, *where, t.requires_grad,
                        t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1))
    return tuple(out)


def _head_dim(op, tensors):
    if op == "attention" and tensors and isinstance(tensors[0], torch.Tensor) and tensors[0].dim() == 5:
        return int(tensors[0].shape[-1])
    return None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def describe(op: str, names, tensors) -> OpInputs:
    """Metadata of `tensors` (None entries skipped), named by `names`, for the dispatcher."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    metas = tuple(TensorMeta(*m) for m in _metas(names, tensors))
    needs_grad = torch.is_grad_enabled() and any(m.requires_grad for m in metas)
    return OpInputs(op, metas, _head_dim(op, tensors), needs_grad, _interpret())


# --------------------------------------------------------------------------------------------------
# Environment probes (once per process; their answers do not change while it runs)
# --------------------------------------------------------------------------------------------------

@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


@functools.cache
def kernel_import_error(module: str, fn: str) -> str | None:
    """None when duodiff_fast.kernels.<module>.<fn> imports, else why not."""
    if triton_import_error() is not None:
        return triton_import_error()
    name = f"duodiff_fast.kernels.{module}"
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        return f"{name} is not importable ({e})"
    if not callable(getattr(mod, fn, None)):
        return f"{name} has no {fn}()"
    return None


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

class Backend:
    """One implementation family. Subclasses override the class attributes and `unavailable_reasons`."""

    NAME = "base"
    OPS: frozenset = frozenset(OPS)
    SUPPORTED_DTYPES: frozenset = FAST_DTYPES
    SUPPORTED_HEAD_DIMS: frozenset | None = None  # attention; None = any
    MIN_COMPUTE_CAPABILITY = (0, 0)
    SUPPORTS_AUTOGRAD = False
    NEEDS_LAST_DIM_CONTIGUOUS = False  # of every tensor argument (the Triton/C++ launchers' contract)

    def unavailable_reasons(self, op: str) -> list[str]:
        """Reasons that do not depend on the inputs (library missing, kernel not written)."""
        return []

    def device_reasons(self, inp: OpInputs) -> list[str]:
        reasons = []
        for m in inp.tensors:
            if m.device_type == "cuda":
                cc = device_capability(m.device_index)
                if cc < self.MIN_COMPUTE_CAPABILITY:
                    reasons.append(f"needs compute capability >= {self.MIN_COMPUTE_CAPABILITY}, "
                                   f"cuda:{m.device_index} has {cc}")
                break
        return reasons

    def not_supported_reasons(self, inp: OpInputs) -> list[str]:
        if inp.op not in self.OPS:
            return [f"has no {inp.op} implementation"]
        reasons = list(self.unavailable_reasons(inp.op))
        main = inp.tensors[0] if inp.tensors else None
        devices = {(m.device_type, m.device_index) for m in inp.tensors}
        if len(devices) > 1:
            reasons.append("inputs are on different devices: " + ", ".join(
                f"{m.name} on {m.device_type}" + ("" if m.device_index < 0 else f":{m.device_index}")
                for m in inp.tensors))
        if main is not None:
            if main.dtype not in self.SUPPORTED_DTYPES:
                ok = ", ".join(sorted(_SHORT.get(d, str(d)) for d in self.SUPPORTED_DTYPES))
                reasons.append(f"dtype {main.dtype} not supported (supports {ok})")
            if main.device_type == "cpu":
                reasons += self.cpu_reasons(inp)
            elif main.device_type != "cuda":
                reasons.append(f"device type {main.device_type} not supported")
        reasons += self.device_reasons(inp) if main is not None and main.device_type == "cuda" else []
        if inp.head_dim is not None and self.SUPPORTED_HEAD_DIMS is not None \
                and inp.head_dim not in self.SUPPORTED_HEAD_DIMS:
            reasons.append(f"head dim {inp.head_dim} not supported "
                           f"(supports {', '.join(map(str, sorted(self.SUPPORTED_HEAD_DIMS)))})")
        if self.NEEDS_LAST_DIM_CONTIGUOUS:
            bad = [m.name for m in inp.tensors if not m.last_dim_contiguous]
            if bad:
                reasons.append(f"last dim of {', '.join(bad)} is not contiguous")
        if inp.needs_grad and not self.SUPPORTS_AUTOGRAD:
            grads = [m.name for m in inp.tensors if m.requires_grad]
            reasons.append(f"inference only, but {', '.join(grads)} require(s) grad with grad mode on")
        return reasons

    def cpu_reasons(self, inp: OpInputs) -> list[str]:
        """Why not on CPU tensors (a GPU-only backend by default)."""
        return ["needs CUDA tensors (inputs are on cpu)"]


class TorchBackend(Backend):
    """Plain torch (SDPA for attention, F.layer_norm for the norms): runs anything, differentiable."""

    NAME = "torch"
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    SUPPORTS_AUTOGRAD = True

    def device_reasons(self, inp):
        return []

    def cpu_reasons(self, inp):
        return []


class TritonBackend(Backend):
    """The Triton kernels of `duodiff_fast.kernels`; on CPU only under TRITON_INTERPRET=1."""

    NAME = "triton"
    SUPPORTED_HEAD_DIMS = ATTENTION_HEAD_DIMS
    MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 and the tile shapes of the kernels assume Ampere or newer
    NEEDS_LAST_DIM_CONTIGUOUS = True

    def unavailable_reasons(self, op):
        err = kernel_import_error(*KERNEL_MODULES[op])
        return [] if err is None else [err]

    def cpu_reasons(self, inp):
        if not inp.interpret:
            return [("needs CUDA tensors (inputs are on cpu; set TRITON_INTERPRET=1 before importing triton "
                     "to run the kernels in the interpreter)")]
        if inp.op == "attention" and inp.tensors[0].dtype == torch.bfloat16:
            # Triton 3.9's interpreter computes tl.dot on bf16 wrongly (DESIGN.md §6).
            return ["the Triton interpreter computes bf16 tl.dot wrongly; use fp16/fp32 on CPU"]
        return []


class CudaBackend(Backend):
    """The compiled `duodiff_fast._C` extension (csrc/)."""

    NAME = "cuda"
    SUPPORTED_HEAD_DIMS = ATTENTION_HEAD_DIMS
    MIN_COMPUTE_CAPABILITY = (8, 0)
    NEEDS_LAST_DIM_CONTIGUOUS = True

    def unavailable_reasons(self, op):
        from .. import _cpp_lib

        reasons = _cpp_lib.unavailable_reasons()
        if not reasons and CUDA_FUNCTIONS[op] in _cpp_lib.missing_ops():
            reasons = [f"duodiff_fast._C has no {CUDA_FUNCTIONS[op]}()"]
        return reasons

    def device_reasons(self, inp):
        from .. import _cpp_lib

        reasons = super().device_reasons(inp)
        main = inp.tensors[0]
        if not reasons and _cpp_lib.is_available():
            major, minor = device_capability(main.device_index)
            if _cpp_lib.arch_supported(major, minor) is False:
                reasons.append(f"duodiff_fast._C was built for sm_{'/'.join(_cpp_lib.built_archs())}, "
                               f"cuda:{main.device_index} is sm_{major}{minor}")
        return reasons


BACKENDS: dict[str, Backend] = {b.NAME: b for b in (CudaBackend(), TritonBackend(), TorchBackend())}


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

def _canonical(op: str, name: str, source: str) -> str:
    name = name.strip().lower()
    if name == "sdpa":
        if op != "attention":
            raise ValueError(f"duodiff_fast.ops.{op}: backend 'sdpa' ({source}) exists for attention only; "
                             f"choose one of {', '.join(PRIORITY)}")
        return "torch"  # SDPA *is* the torch path of attention
    if name not in BACKENDS:
        raise ValueError(f"duodiff_fast.ops.{op}: unknown backend {name!r} ({source}); "
                         f"choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
    return name


def forced_backend(op: str, backend: str | None) -> tuple[str | None, str]:
    """(name or None for automatic, where the request came from)."""
    if backend is not None and backend.strip().lower() != "auto":
        return _canonical(op, backend, f"backend={backend!r}"), f"backend={backend!r}"
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env.lower() != "auto":
            return _canonical(op, env, f"{ENV_VAR}={env}"), f"{ENV_VAR}={env}"
    return None, "automatic"


def all_reasons(inp: OpInputs) -> dict[str, list[str]]:
    """{backend: reasons it cannot run inp} for every backend, in priority order."""
    return {name: BACKENDS[name].not_supported_reasons(inp) for name in PRIORITY}


def _format_inputs(inp: OpInputs) -> str:
    parts = [f"{m.name}: {_SHORT.get(m.dtype, str(m.dtype))} on {m.device_type}"
             f"{'' if m.device_index < 0 else f':{m.device_index}'}"
             f"{' requires_grad' if m.requires_grad else ''}" for m in inp.tensors]
    if inp.head_dim is not None:
        parts.append(f"head_dim={inp.head_dim}")
    return "; ".join(parts)


def select(inp: OpInputs, forced: str | None, source: str) -> str:
    """The forced backend if it can run `inp` (else ValueError with its reasons), or the first that can."""
    if forced is not None:
        reasons = BACKENDS[forced].not_supported_reasons(inp)
        if reasons:
            raise ValueError(
                f"duodiff_fast.ops.{inp.op}: backend {forced!r} was forced ({source}) but cannot run "
                f"these inputs ({_format_inputs(inp)}):\n" + "\n".join(f"  - {r}" for r in reasons))
        return forced
    for name in PRIORITY:
        # The interpreter is a correctness tool, 10-100x slower than torch: only ever used when forced.
        if name == "triton" and inp.interpret and all(m.device_type == "cpu" for m in inp.tensors):
            continue
        if not BACKENDS[name].not_supported_reasons(inp):
            return name
    # Unreachable while torch supports every dtype the ops' validation lets through.
    raise ValueError(f"duodiff_fast.ops.{inp.op}: no backend can run ({_format_inputs(inp)}):\n" + "\n".join(
        f"  {n}: {'; '.join(r)}" for n, r in all_reasons(inp).items()))


@functools.lru_cache(maxsize=4096)
def _select_cached(op, metas, head_dim, needs_grad, interpret, forced, source) -> str:
    inp = OpInputs(op, tuple(TensorMeta(*m) for m in metas), head_dim, needs_grad, interpret)
    return select(inp, forced, source)


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (~2 s) at our import time.

    The decorator only sets this marker (torch 2.4 - 2.13); tests/test_ops.py checks that it still does.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _select(op, metas, head_dim, needs_grad, interpret, forced, source) -> str:
    # Under torch.compile this runs at trace time and its answer is a graph constant. Plain tuples in
    # the signature: Dynamo rebuilds NamedTuple arguments of such functions wrongly (torch 2.13).
    return _select_cached(op, metas, head_dim, needs_grad, interpret, forced, source)


def choose(op: str, names, tensors, backend: str | None) -> str:
    """The backend that runs `op` on `tensors` (the ops' internal entry point; a few microseconds)."""
    forced, source = forced_backend(op, backend)
    metas = _metas(names, tensors)
    needs_grad = torch.is_grad_enabled() and any(m[4] for m in metas)
    return _select(op, metas, _head_dim(op, tensors), needs_grad, _interpret(), forced, source)


def clear_caches() -> None:
    """Forget probed environment and cached choices (tests that patch the environment call this)."""
    for f in (triton_import_error, kernel_import_error, device_capability, _select_cached):
        f.cache_clear()

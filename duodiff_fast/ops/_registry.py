"""The op registry: every op declared once, every backend's implementation registered once, one dispatcher.

Two kinds of declarations, after xformers' `fmha/dispatch.py`:

- `OpSpec` (in `ops/<op>.py`): the public name, its tensor inputs, the float64 reference, example inputs
  at the benchmark shapes, and the FLOP/byte model. Registered with `register_op`.
- `Impl` subclasses, one per (op, backend): the class that says what it supports
  (`not_supported_reasons`) *is* the implementation (`apply`). The torch implementation of an op lives in
  the op's own module; the fast ones in `ops/backends/<backend>.py`. Registered with `register_impl`.

Everything else is derived from these two tables: the dispatch order, `python -m duodiff_fast.info`, the
compile report (`kernel_modules()`), the benchmark providers (`implementations(op)`), and the functions
the compiled extension must provide (`cuda_functions()`).

Dispatch. `choose(op, tensors, backend)` returns a backend name. It depends only on tensor metadata
(dtype, device, grad, last-dim contiguity, head dim) and the environment, so the answer is cached per
distinct signature and, under `torch.compile`, evaluated at trace time as a constant. Order: a forced
backend (`backend=` per call, or `DUODIFF_BACKEND`) must be able to run or the call raises with its
reasons; otherwise the first able backend of the priority list wins, quietly falling back to torch.
Between `cuda` and `triton` the order per op and GPU architecture comes from measured results
(`measured_order.json`, written by `bench/kernels.py --write-order`); with no measurement for the running
architecture Triton comes first, so a kernel that has never run on a card is not picked there.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

ENV_VAR = "DUODIFF_BACKEND"
BACKEND_NAMES = ("triton", "cuda", "torch")  # every backend a user can force; 'sdpa' is attention's torch
DEFAULT_PRIORITY = ("triton", "cuda", "torch")
FAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
ALL_FLOAT_DTYPES = FAST_DTYPES | {torch.float64}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
MEASURED_ORDER_FILE = Path(__file__).with_name("measured_order.json")


# --------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    """One op, declared once.

    inputs:    names of the tensor arguments, in call order (the first is the main tensor);
    reference: `<op>_ref(*args, upcast=False)`, float64 with upcast=True (tests and benchmarks);
    examples:  `examples(device, dtype, kind) -> {label: args}`; kind 'bench' gives the DESIGN §7
               shapes, 'small' a CPU-sized set, 'typical' one model-like input (info);
    flops / bytes: work model of one call on `args` (bytes read + written once), for roofline units;
    head_dim:  for attention, the head dim of the inputs (dispatch declares supported ones).
    """
    name: str
    inputs: tuple
    summary: str
    reference: Callable
    examples: Callable
    bytes: Callable
    flops: Callable | None = None
    head_dim: Callable | None = None
    aliases: dict = field(default_factory=dict)  # extra backend names: {'sdpa': 'torch'}


OPS: dict[str, OpSpec] = {}
IMPLS: dict[str, dict[str, type]] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is registered twice")
    OPS[spec.name] = spec
    IMPLS.setdefault(spec.name, {})
    return spec


def register_impl(cls):
    """Class decorator: `cls` implements `cls.OP` for backend `cls.BACKEND`."""
    if cls.OP not in OPS:
        raise ValueError(f"{cls.__name__}: op {cls.OP!r} is not registered (register the OpSpec first)")
    if cls.BACKEND not in BACKEND_NAMES:
        raise ValueError(f"{cls.__name__}: unknown backend {cls.BACKEND!r}; add it to BACKEND_NAMES")
    IMPLS[cls.OP][cls.BACKEND] = cls
    clear_caches()
    return cls


def implementations(op: str) -> dict:
    """{backend: Impl class} registered for `op`."""
    _check_op(op)
    return dict(IMPLS[op])


def _impl_table(backend: str, attr: str) -> dict:
    """{value of `attr` on `backend`'s implementations: [ops]} (implementations without it skipped)."""
    out = {}
    for op, impls in IMPLS.items():
        value = getattr(impls.get(backend), attr, None)
        if value:
            out.setdefault(value, []).append(op)
    return out


def kernel_modules() -> dict:
    """{module: [ops]} of the Triton kernel modules (`duodiff_fast.kernels.<module>`), for the compile
    report: each module's `aot_specs()` lists its compile configurations."""
    return _impl_table("triton", "KERNEL_MODULE")


def cuda_functions() -> dict:
    """{`_C` function name: [ops]}: what the compiled extension must export (its contract)."""
    return _impl_table("cuda", "CPP_FUNCTION")


# --------------------------------------------------------------------------------------------------
# What dispatch may look at
# --------------------------------------------------------------------------------------------------

class TensorMeta(NamedTuple):
    """What dispatch may look at in one tensor argument (hashable, so selection can be cached)."""
    name: str
    dtype: torch.dtype
    device_type: str
    device_index: int  # -1 when the device has no index (cpu)
    requires_grad: bool
    last_dim_contiguous: bool
    last_dim: int  # size of the last dim (row width for the norms)


class OpInputs(NamedTuple):
    op: str
    tensors: tuple  # tuple[TensorMeta, ...], the op's main tensor first
    head_dim: int | None  # attention only
    needs_grad: bool  # grad mode on and some input requires grad
    interpret: bool  # TRITON_INTERPRET=1


def _metas(names, tensors) -> tuple:
    """Plain-tuple TensorMeta fields of the tensors among `tensors` (the hot path avoids NamedTuples)."""
    out = []
    for name, t in zip(names, tensors):
        if t is None:
            continue
        # is_cuda / is_cpu / get_device() avoid building a torch.device per tensor on the hot path
        if t.is_cuda:
            dt, di = "cuda", t.get_device()
        elif t.is_cpu:
            dt, di = "cpu", -1
        else:
            dt, di = t.device.type, -1
        last = t.shape[-1] if t.dim() else 1
        out.append((name, t.dtype, dt, di, t.requires_grad, t.dim() == 0 or t.stride(-1) == 1 or last == 1, last))
    return tuple(out)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _head_dim(op, tensors):
    spec = OPS[op]
    return None if spec.head_dim is None else spec.head_dim(tensors)


def describe(op: str, names, tensors) -> OpInputs:
    """Metadata of `tensors` (None entries skipped), named by `names`, for the dispatcher."""
    _check_op(op)
    metas = tuple(TensorMeta(*m) for m in _metas(names, tensors))
    needs_grad = torch.is_grad_enabled() and any(m.requires_grad for m in metas)
    return OpInputs(op, metas, _head_dim(op, tensors), needs_grad, _interpret())


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")


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
# Implementations
# --------------------------------------------------------------------------------------------------

class Impl:
    """One backend's implementation of one op. Subclasses set OP, BACKEND and the capability attributes,
    and define `apply(*args)` (inputs already validated by the public function)."""

    OP: str = ""
    BACKEND: str = ""
    SUPPORTED_DTYPES: frozenset = FAST_DTYPES
    SUPPORTED_HEAD_DIMS: frozenset | None = None  # attention; None = any
    MIN_COMPUTE_CAPABILITY = (0, 0)
    SUPPORTS_AUTOGRAD = False
    NEEDS_LAST_DIM_CONTIGUOUS = False  # of every tensor argument (the Triton/C++ launchers' contract)

    @classmethod
    def unavailable_reasons(cls) -> list[str]:
        """Reasons that do not depend on the inputs (library missing, kernel not built)."""
        return []

    @classmethod
    def device_reasons(cls, inp: OpInputs) -> list[str]:
        for m in inp.tensors:
            if m.device_type == "cuda":
                cc = device_capability(m.device_index)
                if cc < cls.MIN_COMPUTE_CAPABILITY:
                    return [f"needs compute capability >= {cls.MIN_COMPUTE_CAPABILITY}, "
                            f"cuda:{m.device_index} has {cc}"]
                break
        return []

    @classmethod
    def cpu_reasons(cls, inp: OpInputs) -> list[str]:
        """Why not on CPU tensors (a GPU-only backend by default)."""
        return ["needs CUDA tensors (inputs are on cpu)"]

    @classmethod
    def input_reasons(cls, inp: OpInputs) -> list[str]:
        """Op-specific reasons (override)."""
        return []

    @classmethod
    def not_supported_reasons(cls, inp: OpInputs) -> list[str]:
        reasons = list(cls.unavailable_reasons())
        main = inp.tensors[0] if inp.tensors else None
        devices = {(m.device_type, m.device_index) for m in inp.tensors}
        if len(devices) > 1:
            reasons.append("inputs are on different devices: " + ", ".join(
                f"{m.name} on {m.device_type}" + ("" if m.device_index < 0 else f":{m.device_index}")
                for m in inp.tensors))
        if main is not None:
            if main.dtype not in cls.SUPPORTED_DTYPES:
                ok = ", ".join(sorted(_SHORT.get(d, str(d)) for d in cls.SUPPORTED_DTYPES))
                reasons.append(f"dtype {main.dtype} not supported (supports {ok})")
            if main.device_type == "cpu":
                reasons += cls.cpu_reasons(inp)
            elif main.device_type == "cuda":
                reasons += cls.device_reasons(inp)
            else:
                reasons.append(f"device type {main.device_type} not supported")
        if inp.head_dim is not None and cls.SUPPORTED_HEAD_DIMS is not None \
                and inp.head_dim not in cls.SUPPORTED_HEAD_DIMS:
            reasons.append(f"head dim {inp.head_dim} not supported "
                           f"(supports {', '.join(map(str, sorted(cls.SUPPORTED_HEAD_DIMS)))})")
        if cls.NEEDS_LAST_DIM_CONTIGUOUS:
            bad = [m.name for m in inp.tensors if not m.last_dim_contiguous]
            if bad:
                reasons.append(f"last dim of {', '.join(bad)} is not contiguous")
        if inp.needs_grad and not cls.SUPPORTS_AUTOGRAD:
            grads = [m.name for m in inp.tensors if m.requires_grad]
            reasons.append(f"inference only, but {', '.join(grads)} require(s) grad with grad mode on")
        reasons += cls.input_reasons(inp)
        return reasons

    @staticmethod
    def apply(*args):
        raise NotImplementedError


class TorchImpl(Impl):
    """Plain torch: runs anything floating on any device, differentiable. The fallback of every op."""

    BACKEND = "torch"
    SUPPORTED_DTYPES = ALL_FLOAT_DTYPES
    SUPPORTS_AUTOGRAD = True

    @classmethod
    def device_reasons(cls, inp):
        return []

    @classmethod
    def cpu_reasons(cls, inp):
        return []

    @classmethod
    def not_supported_reasons(cls, inp):
        reasons = super().not_supported_reasons(inp)
        # torch runs on any device type (meta, mps, ...): drop that reason only
        return [r for r in reasons if not r.startswith("device type ")]


# --------------------------------------------------------------------------------------------------
# Priority (measured order between cuda and triton per op and architecture)
# --------------------------------------------------------------------------------------------------

@functools.cache
def measured_order() -> dict:
    """{op: {'sm_90': ['cuda', 'triton'], ...}} from measured_order.json ({} when absent/unreadable)."""
    try:
        data = json.loads(MEASURED_ORDER_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return {op: {arch: list(order) for arch, order in per.items()} for op, per in data.get("order", {}).items()}


@functools.cache
def priority(op: str, arch: str | None) -> tuple:
    """Backends in the order automatic dispatch tries them for `op` on `arch` ('sm_90', None for CPU)."""
    order = measured_order().get(op, {}).get(arch) if arch else None
    if not order:
        return DEFAULT_PRIORITY
    fast = [b for b in order if b in BACKEND_NAMES and b != "torch"]
    rest = [b for b in DEFAULT_PRIORITY if b not in fast]
    return tuple(fast + rest)


def _arch(inp: OpInputs) -> str | None:
    main = inp.tensors[0] if inp.tensors else None
    if main is None or main.device_type != "cuda":
        return None
    major, minor = device_capability(main.device_index)
    return f"sm_{major}{minor}"


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

def _canonical(op: str, name: str, source: str) -> str:
    name = name.strip().lower()
    alias = OPS[op].aliases.get(name)
    if alias is not None:
        return alias
    for other, spec in OPS.items():
        if name in spec.aliases:
            raise ValueError(f"duodiff_fast.ops.{op}: backend {name!r} ({source}) exists for {other} only; "
                             f"choose one of {', '.join(BACKEND_NAMES)}")
    if name not in BACKEND_NAMES:
        aliases = sorted({a for s in OPS.values() for a in s.aliases})
        raise ValueError(f"duodiff_fast.ops.{op}: unknown backend {name!r} ({source}); "
                         f"choose one of {', '.join(BACKEND_NAMES + tuple(aliases))} or 'auto'")
    return name


def forced_backend(op: str, backend: str | None) -> tuple[str | None, str]:
    """(name or None for automatic, where the request came from)."""
    if backend is not None:
        if not isinstance(backend, str):
            raise ValueError(f"duodiff_fast.ops.{op}: backend must be a name ({', '.join(BACKEND_NAMES)}, "
                             f"'auto') or None, got {backend!r}")
        if backend.strip().lower() != "auto":
            return _canonical(op, backend, f"backend={backend!r}"), f"backend={backend!r}"
        return None, "automatic"
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        return _canonical(op, env, f"{ENV_VAR}={env}"), f"{ENV_VAR}={env}"
    return None, "automatic"


def _reasons(op: str, backend: str, inp: OpInputs) -> list[str]:
    cls = IMPLS[op].get(backend)
    if cls is None:
        return [f"has no {op} implementation"]
    return cls.not_supported_reasons(inp)


def all_reasons(inp: OpInputs) -> dict[str, list[str]]:
    """{backend: reasons it cannot run inp} for every backend, in this op's priority order."""
    return {name: _reasons(inp.op, name, inp) for name in priority(inp.op, _arch(inp))}


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
        reasons = _reasons(inp.op, forced, inp)
        if reasons:
            raise ValueError(
                f"duodiff_fast.ops.{inp.op}: backend {forced!r} was forced ({source}) but cannot run "
                f"these inputs ({_format_inputs(inp)}):\n" + "\n".join(f"  - {r}" for r in reasons))
        return forced
    for name in priority(inp.op, _arch(inp)):
        # The interpreter is a correctness tool, 10-100x slower than torch: only ever used when forced.
        if name == "triton" and inp.interpret and all(m.device_type == "cpu" for m in inp.tensors):
            continue
        if not _reasons(inp.op, name, inp):
            return name
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
    hd = _head_dim(op, tensors)
    return _select(op, metas, hd, needs_grad, _interpret(), forced, source)


def clear_caches() -> None:
    """Forget probed environment and cached choices (tests that patch the environment call this)."""
    for f in (triton_import_error, kernel_import_error, device_capability, _select_cached, measured_order,
              priority):
        f.cache_clear()


def tracing() -> bool:
    """Under torch.compile / export / fake tensors the registered op must be called (its fake impl is
    used); eager calls skip the dispatcher and run the implementation directly."""
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(
        torch._C._TorchDispatchModeKey.FAKE) is not None

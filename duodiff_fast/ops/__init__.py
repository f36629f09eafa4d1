"""Public ops with backend dispatch. Each has a pure-torch `<op>_ref` beside it.

Backends (see `_dispatch.py`): `cuda` (the compiled `_C`), `triton` (`duodiff_fast.kernels`, on CPU
only under TRITON_INTERPRET=1), `torch` (SDPA / F.layer_norm; always there, differentiable) and, for
attention, `sdpa` as another name for `torch`. Automatic choice takes the first of cuda, triton, torch
that can run the inputs; `backend=` (or `DUODIFF_BACKEND`) forces one and raises if it cannot.
Inputs that require grad with grad mode on go to torch: the fast kernels are inference-only.

torch.library registration. Each public function validates its inputs, chooses a backend in Python
(at trace time under torch.compile, where the choice is a constant), then:
- torch: runs plain torch code, which torch.compile traces and fuses like any other torch code and
  autograd differentiates;
- triton / cuda: calls one registered op per public function, `torch.ops.duodiff.<op>(..., backend)`,
  with the backend name as a string argument. One op per function (rather than per backend) keeps the
  graph readable and the fake impl in one place; the string costs nothing since it is a constant.
The ops use `torch.library.custom_op` + `register_fake`, not `triton_op` + `wrap_triton`: with torch
2.13 (CPU) and triton 3.9 the interpreter touches fake tensors' data inside torch.compile, while an
opaque custom op with a fake impl compiles with fullgraph=True on CPU and on CUDA alike, and is captured
by CUDA Graphs since the kernels launch on the current stream without host syncs. The price is that
Inductor cannot fuse into our kernels, which are already fused. Outside tracing the impl is called
directly, skipping the dispatcher's per-call overhead (tens of microseconds, as much as a small kernel).
"""
import torch

from . import _dispatch
from ._dispatch import BACKEND_NAMES, BACKENDS, OPS, PRIORITY
from .attention import _check_qkv, attention_fast, attention_op, attention_ref, attention_sdpa
from .exit_confidence import (
    check_exit_confidence_inputs,
    exit_confidence_fast,
    exit_confidence_op,
    exit_confidence_ref,
)
from .norm import (
    adaln_op,
    adaln_ref,
    adaln_torch,
    add_layer_norm_op,
    add_layer_norm_ref,
    add_layer_norm_torch,
    check_norm_inputs,
    gated_adaln_op,
    gated_adaln_ref,
    gated_adaln_torch,
    layer_norm_op,
    layer_norm_ref,
    layer_norm_torch,
    norm_fast,
)


def _tracing() -> bool:
    # Under torch.compile / export (and other fake-tensor tracing) the registered op must be called so
    # that its fake impl is used; eager calls skip the dispatcher.
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(
        torch._C._TorchDispatchModeKey.FAKE) is not None


def attention(qkv, scale=None, backend=None):
    """Multi-head attention on packed qkv `[B, L, 3, H, D]` -> `[B, L, H*D]` in qkv's dtype.

    `scale` defaults to D**-0.5. No transpose or copy around the fast kernels.
    """
    _check_qkv(qkv)
    if scale is not None and not float(scale) > 0:  # the kernels fold log2(e) * scale into exp2
        raise ValueError(f"attention: scale must be a positive number, got {scale!r}")
    name = _dispatch.choose("attention", ("qkv",), (qkv,), backend)
    if name == "torch":
        return attention_sdpa(qkv, scale)
    s = float(qkv.shape[-1] ** -0.5 if scale is None else scale)
    if _tracing():
        return attention_op(qkv, s, name)
    return attention_fast(qkv, s, name)


def layer_norm(x, weight, bias, eps=1e-5, backend=None):
    """LayerNorm over the last dim: `LN(x) * weight + bias` (weight/bias may be None); fp32 statistics."""
    check_norm_inputs("layer_norm", x, weight=weight, bias=bias)
    name = _dispatch.choose("layer_norm", ("x", "weight", "bias"), (x, weight, bias), backend)
    if name == "torch":
        return layer_norm_torch(x, weight, bias, eps)
    if x.dim() not in (2, 3):  # the kernels take [N, C] or [B, L, C]; fold other leading dims
        return layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, eps, backend=name).view(x.shape)
    if _tracing():
        return layer_norm_op(x, weight, bias, float(eps), name)
    return norm_fast(name, x, eps=float(eps), weight=weight, bias=bias)[1]


def add_layer_norm(x, update, weight, bias, eps=1e-5, backend=None):
    """U-ViT residual step: returns `(x + update, LN(x + update) * weight + bias)`."""
    check_norm_inputs("add_layer_norm", x, update=update, weight=weight, bias=bias)
    name = _dispatch.choose("add_layer_norm", ("x", "update", "weight", "bias"), (x, update, weight, bias),
                            backend)
    if name == "torch":
        return add_layer_norm_torch(x, update, weight, bias, eps)
    if x.dim() not in (2, 3):
        C = x.shape[-1]
        r, y = add_layer_norm(x.reshape(-1, C), update.reshape(-1, C), weight, bias, eps, backend=name)
        return r.view(x.shape), y.view(x.shape)
    if _tracing():
        return add_layer_norm_op(x, update, weight, bias, float(eps), name)
    return norm_fast(name, x, eps=float(eps), weight=weight, bias=bias, update=update)


def adaln(x, shift, scale, eps=1e-6, weight=None, bias=None, backend=None):
    """DiT's `modulate(norm(x), shift, scale)`: `LN(x)[*w+b] * (1 + scale[b]) + shift[b]`.

    x is `[B, L, C]` (or `[B, C]`); shift/scale are `[B, C]`, possibly strided chunks of the adaLN output.
    """
    check_norm_inputs("adaln", x, shift=shift, scale=scale, weight=weight, bias=bias, per_sample=True)
    name = _dispatch.choose("adaln", ("x", "shift", "scale", "weight", "bias"),
                            (x, shift, scale, weight, bias), backend)
    if name == "torch":
        return adaln_torch(x, shift, scale, eps, weight, bias)
    if _tracing():
        return adaln_op(x, shift, scale, float(eps), weight, bias, name)
    return norm_fast(name, x, eps=float(eps), weight=weight, bias=bias, shift=shift, scale=scale)[1]


def gated_adaln(x, update, gate, shift, scale, eps=1e-6, backend=None):
    """DiT residual + next norm: `(r := x + gate[b] * update, LN(r) * (1 + scale[b]) + shift[b])`."""
    check_norm_inputs("gated_adaln", x, update=update, gate=gate, shift=shift, scale=scale, per_sample=True)
    name = _dispatch.choose("gated_adaln", ("x", "update", "gate", "shift", "scale"),
                            (x, update, gate, shift, scale), backend)
    if name == "torch":
        return gated_adaln_torch(x, update, gate, shift, scale, eps)
    if _tracing():
        return gated_adaln_op(x, update, gate, shift, scale, float(eps), name)
    return norm_fast(name, x, eps=float(eps), update=update, gate=gate, shift=shift, scale=scale)


def exit_confidence(h, weight, bias, start=0, backend=None):
    """Early-exit confidence `[B]` float32: mean over tokens `l >= start` and the K outputs of
    `sigmoid(h[b, l] @ weight + bias)`; h `[B, L, C]`, weight `[C, K]`, bias `[K]`."""
    check_exit_confidence_inputs(h, weight, bias, start)
    name = _dispatch.choose("exit_confidence", ("h", "weight", "bias"), (h, weight, bias), backend)
    if name == "torch":
        return exit_confidence_ref(h, weight, bias, start)
    if _tracing():
        return exit_confidence_op(h, weight, bias, int(start), name)
    return exit_confidence_fast(h, weight, bias, int(start), name)


_PUBLIC_INPUTS = {
    "attention": ("qkv",),
    "layer_norm": ("x", "weight", "bias"),
    "add_layer_norm": ("x", "update", "weight", "bias"),
    "adaln": ("x", "shift", "scale", "weight", "bias"),
    "gated_adaln": ("x", "update", "gate", "shift", "scale"),
    "exit_confidence": ("h", "weight", "bias"),
}


def select_backend(op, *inputs, backend=None):
    """Name of the backend that `op` would use for these tensor inputs (in the op's argument order).

    >>> select_backend("attention", qkv)                  # 'triton' on a GPU, 'torch' on a CPU
    >>> select_backend("adaln", x, shift, scale, backend="cuda")  # raises ValueError if it cannot run
    """
    if op not in _PUBLIC_INPUTS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return _dispatch.choose(op, _PUBLIC_INPUTS[op], inputs, backend)


def explain(op, *inputs, backend=None):
    """For `python -m duodiff_fast.info`: the chosen backend and every backend's reasons not to run.

    Returns {"op", "chosen", "forced_by", "reasons": {backend: [reason, ...]}} ("chosen" is None and
    "error" is set when a forced backend cannot run).
    """
    if op not in _PUBLIC_INPUTS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    inp = _dispatch.describe(op, _PUBLIC_INPUTS[op], inputs)
    forced, source = _dispatch.forced_backend(op, backend)
    out = {"op": op, "chosen": None, "forced_by": source, "reasons": _dispatch.all_reasons(inp)}
    try:
        out["chosen"] = _dispatch.select(inp, forced, source)
    except ValueError as e:
        out["error"] = str(e)
    return out


__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "OPS",
    "PRIORITY",
    "adaln",
    "adaln_ref",
    "add_layer_norm",
    "add_layer_norm_ref",
    "attention",
    "attention_ref",
    "attention_sdpa",
    "exit_confidence",
    "exit_confidence_ref",
    "explain",
    "gated_adaln",
    "gated_adaln_ref",
    "layer_norm",
    "layer_norm_ref",
    "select_backend",
]

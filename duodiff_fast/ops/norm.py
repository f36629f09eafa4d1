"""Ops of the layer-norm family: plain, residual-add, adaLN (per-sample modulation) and gated adaLN.

Definitions (DESIGN.md §4), x: [B, L, C] (or [N, C]; layer_norm / add_layer_norm take any leading dims):
  layer_norm(x, w, b, eps)                    = LN(x) * w + b
  add_layer_norm(x, u, w, b, eps)             = (x + u, LN(x + u) * w + b)
  adaln(x, shift, scale, eps, w=None, b=None) = LN(x)[*w+b] * (1 + scale[b]) + shift[b]
  gated_adaln(x, u, gate, shift, scale, eps)  = (r := x + gate[b] * u, adaln(r, shift, scale, eps))
shift/scale/gate are [B, C] and may be strided chunks of one [B, 6C] tensor; weight, bias and the
modulation may have another floating dtype than x (they are applied in fp32). Statistics in fp32 (fp64
for fp64 x); outputs in x's dtype. Declared here once: validation, float64 references, torch
implementations, fakes, examples, byte model. Fast implementations: `ops/backends/` (one fused kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import check_float
from ._registry import IMPLS, OpSpec, TorchImpl, choose, register_impl, register_op, tracing

NORM_OPS = ("layer_norm", "add_layer_norm", "adaln", "gated_adaln")


# --------------------------------------------------------------------------------------------------
# References (float64 with upcast=True)
# --------------------------------------------------------------------------------------------------

def _ln(x, weight, bias, eps, upcast):
    dt = torch.float64 if upcast or x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y


def _modulate(y, shift, scale):
    # (B, C) -> broadcast over tokens of (B, L, C)
    if y.dim() == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return y * (1 + scale.to(y.dtype)) + shift.to(y.dtype)


def _out(y, like, upcast):
    return y if upcast else y.to(like.dtype)


def layer_norm_ref(x, weight, bias, eps=1e-5, upcast=False):
    return _out(_ln(x, weight, bias, eps, upcast), x, upcast)


def add_layer_norm_ref(x, update, weight, bias, eps=1e-5, upcast=False):
    dt = torch.float64 if upcast else x.dtype
    r = x.to(dt) + update.to(dt)
    return r, _out(_ln(r, weight, bias, eps, upcast), x, upcast)


def adaln_ref(x, shift, scale, eps=1e-6, weight=None, bias=None, upcast=False):
    y = _ln(x, weight, bias, eps, upcast)
    return _out(_modulate(y, shift, scale), x, upcast)


def gated_adaln_ref(x, update, gate, shift, scale, eps=1e-6, upcast=False):
    dt = torch.float64 if upcast else x.dtype
    g = gate.to(dt)
    if x.dim() == 3:
        g = g.unsqueeze(1)
    r = x.to(dt) + g * update.to(dt)
    return r, adaln_ref(r, shift, scale, eps, upcast=upcast).to(r.dtype)


# --------------------------------------------------------------------------------------------------
# Torch implementations: native fused F.layer_norm, outputs in x's dtype
# --------------------------------------------------------------------------------------------------

def layer_norm_torch(x, weight, bias, eps=1e-5):
    """Fused native layer_norm. Affine parameters of another dtype than x are applied in fp32 (fp64 for
    fp64 x), as the fast kernels do, instead of failing inside F.layer_norm."""
    if (weight is None or weight.dtype == x.dtype) and (bias is None or bias.dtype == x.dtype):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    return F.layer_norm(x.to(dt), (x.shape[-1],), w, b, eps).to(x.dtype)


def _modulate_torch(y, shift, scale):
    # DiT's modulate(): y * (1 + scale) + shift with (B, C) broadcast over the tokens of (B, L, C)
    if y.dim() == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return y * (1 + scale.to(y.dtype)) + shift.to(y.dtype)


def add_layer_norm_torch(x, update, weight, bias, eps=1e-5):
    r = x + update
    return r, layer_norm_torch(r, weight, bias, eps)


def adaln_torch(x, shift, scale, eps=1e-6, weight=None, bias=None):
    return _modulate_torch(layer_norm_torch(x, weight, bias, eps), shift, scale)


def gated_adaln_torch(x, update, gate, shift, scale, eps=1e-6):
    g = gate.to(x.dtype)
    r = x + (g.unsqueeze(1) if x.dim() == 3 else g) * update
    return r, adaln_torch(r, shift, scale, eps)


# --------------------------------------------------------------------------------------------------
# Validation (once per call, every backend): errors name the argument and the problem
# --------------------------------------------------------------------------------------------------

def _where(t):
    # (is_cuda, index) identifies CUDA devices; other tensors compare by device type (cheap on CPU).
    return (True, t.get_device()) if t.is_cuda else (False, "cpu" if t.is_cpu else t.device.type)


def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _what(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t)


def check_norm_inputs(op, x, update=None, gate=None, shift=None, scale=None, weight=None, bias=None,
                      per_sample=False, eps=None):
    """Raise ValueError naming the first bad argument of a norm-family op; returns eps as a float."""
    if not _is_float_tensor(x):
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a floating-point tensor, got {what}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have a non-empty last dim C, got shape {tuple(x.shape)}")
    if per_sample and x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must be [B, L, C] (or [B, C]), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    dev = _where(x)
    if update is not None:
        if not _is_float_tensor(update) or update.shape != x.shape:
            raise ValueError(f"{op}: update must be a floating-point tensor of x's shape {tuple(x.shape)}, "
                             f"got {_what(update)}")
        if update.dtype != x.dtype:
            raise ValueError(f"{op}: update dtype {update.dtype} differs from x dtype {x.dtype}")
        if _where(update) != dev:
            raise ValueError(f"{op}: update is on {update.device}, x on {x.device}")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is None:
            continue
        if not _is_float_tensor(t) or t.shape != (x.shape[0], C):
            raise ValueError(f"{op}: {name} must be a floating-point [B, C] = [{x.shape[0]}, {C}] tensor, "
                             f"got {_what(t)}")
        if _where(t) != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not _is_float_tensor(t) or t.shape != (C,):
            raise ValueError(f"{op}: {name} must be a floating-point [C] = [{C}] tensor, got {_what(t)}")
        if _where(t) != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if eps is None:
        return None
    if type(eps) is float and 0.0 <= eps < float("inf"):  # the common case, without the generic checks
        return eps
    return check_float(eps, "eps", minimum=0.0, where=op)


# --------------------------------------------------------------------------------------------------
# Declarations: examples and byte model
# --------------------------------------------------------------------------------------------------

# (B, L, C): U-ViT-S CIFAR and DiT-XL/2, then a sweep at DiT-XL width from 0.6 to 151 MB of bf16 x.
BENCH_SHAPES = [(128, 257, 512), (32, 256, 1152)] + [(b, 256, 1152) for b in (1, 4, 16, 64, 128, 256)]
SMALL_SHAPES = [(8, 257, 512), (4, 256, 1152)]


def norm_inputs(op, B, L, C, device, dtype, seed=0):
    """Model-like inputs of `op`: shift/scale/gate are strided chunks of a [B, 6C] adaLN output."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device=device, generator=g).to(dtype)

    x = rnd(B, L, C)
    ada = rnd(B, 6 * C)
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    w, b = rnd(C), rnd(C)
    return {
        "layer_norm": (x, w, b),
        "add_layer_norm": (x, rnd(B, L, C), w, b),
        "adaln": (x, shift, scale),
        "gated_adaln": (x, rnd(B, L, C), gate, shift, scale),
    }[op]


def _examples_of(op):
    def examples(device, dtype, kind="bench"):
        shapes = {"bench": BENCH_SHAPES, "small": SMALL_SHAPES, "typical": [(2, 257, 512)]}[kind]
        out = {}
        for B, L, C in shapes:
            args = norm_inputs(op, B, L, C, device, dtype)
            out[f"B={B} L={L} C={C} ({args[0].numel() * args[0].element_size() / 2**20:.1f} MiB x)"] = args
        return out
    return examples


_STREAMS = {"layer_norm": 2, "add_layer_norm": 4, "adaln": 2, "gated_adaln": 4}


def _bytes_of(op):
    def nbytes(args):
        x = args[0]
        n = x.numel() * x.element_size()
        tensors = [t for t in args[1:] if isinstance(t, torch.Tensor)]
        per_sample = sum(t.numel() * t.element_size() for t in tensors if t.dim() == 2 and t.shape != x.shape)
        weights = sum(t.numel() * t.element_size() for t in tensors if t.dim() == 1)
        return _STREAMS[op] * n + per_sample + weights  # x (+ update) read, y (+ residual) written once
    return nbytes


_SUMMARY = {
    "layer_norm": "LN(x) * w + b",
    "add_layer_norm": "(x + u, LN(x + u) * w + b): U-ViT's residual fused with the next norm",
    "adaln": "LN(x) * (1 + scale[b]) + shift[b]: DiT's modulate(norm(x))",
    "gated_adaln": "(r = x + gate[b] * u, adaln(r)): DiT's gated residual fused with the next adaLN",
}
_REFS = {"layer_norm": layer_norm_ref, "add_layer_norm": add_layer_norm_ref, "adaln": adaln_ref,
         "gated_adaln": gated_adaln_ref}
_INPUTS = {"layer_norm": ("x", "weight", "bias"), "add_layer_norm": ("x", "update", "weight", "bias"),
           "adaln": ("x", "shift", "scale", "weight", "bias"),
           "gated_adaln": ("x", "update", "gate", "shift", "scale")}
SPECS = {op: register_op(OpSpec(name=op, inputs=_INPUTS[op], summary=_SUMMARY[op], reference=_REFS[op],
                                examples=_examples_of(op), bytes=_bytes_of(op))) for op in NORM_OPS}


# One torch implementation class per op (the registry's unit), made from the functions above.
TORCH_IMPLS = {op: register_impl(type(f"Torch_{op}", (TorchImpl,), {"OP": op, "apply": staticmethod(fn)}))
               for op, fn in (("layer_norm", layer_norm_torch), ("add_layer_norm", add_layer_norm_torch),
                              ("adaln", adaln_torch), ("gated_adaln", gated_adaln_torch))}


# --------------------------------------------------------------------------------------------------
# torch.library ops (see ops/__init__.py for why custom_op and not triton_op)
# --------------------------------------------------------------------------------------------------

def _contig(*ts):
    # A compiled graph could hand the registered op a re-laid-out input: make the last dim dense.
    return tuple(t if t is None or t.stride(-1) == 1 else t.contiguous() for t in ts)


def _new_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("duodiff::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  backend: str) -> torch.Tensor:
    """Registered op: LN(x) * weight + bias."""
    x, weight, bias = _contig(x, weight, bias)
    return IMPLS["layer_norm"][backend].apply(x, weight, bias, eps)


@torch.library.custom_op("duodiff::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: (x + update, LN(x + update) * weight + bias)."""
    x, update, weight, bias = _contig(x, update, weight, bias)
    return IMPLS["add_layer_norm"][backend].apply(x, update, weight, bias, eps)


@torch.library.custom_op("duodiff::adaln", mutates_args=())
def adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             weight: torch.Tensor | None, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Registered op: LN(x)[*w+b] * (1 + scale[b]) + shift[b]."""
    x, shift, scale, weight, bias = _contig(x, shift, scale, weight, bias)
    return IMPLS["adaln"][backend].apply(x, shift, scale, eps, weight, bias)


@torch.library.custom_op("duodiff::gated_adaln", mutates_args=())
def gated_adaln_op(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                   scale: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: (r := x + gate[b] * update, LN(r) * (1 + scale[b]) + shift[b])."""
    x, update, gate, shift, scale = _contig(x, update, gate, shift, scale)
    return IMPLS["gated_adaln"][backend].apply(x, update, gate, shift, scale, eps)


@layer_norm_op.register_fake
def _(x, weight, bias, eps, backend):
    return _new_like(x)


@add_layer_norm_op.register_fake
def _(x, update, weight, bias, eps, backend):
    return _new_like(x), _new_like(x)


@adaln_op.register_fake
def _(x, shift, scale, eps, weight, bias, backend):
    return _new_like(x)


@gated_adaln_op.register_fake
def _(x, update, gate, shift, scale, eps, backend):
    return _new_like(x), _new_like(x)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------

def layer_norm(x, weight, bias, eps=1e-5, backend=None):
    """LayerNorm over the last dim: `LN(x) * weight + bias` (weight/bias may be None); fp32 statistics."""
    eps = check_norm_inputs("layer_norm", x, weight=weight, bias=bias, eps=eps)
    name = choose("layer_norm", ("x", "weight", "bias"), (x, weight, bias), backend)
    if name == "torch" or x.numel() == 0:
        return layer_norm_torch(x, weight, bias, eps)
    if tracing():
        return layer_norm_op(x, weight, bias, eps, name)
    return IMPLS["layer_norm"][name].apply(x, weight, bias, eps)


def add_layer_norm(x, update, weight, bias, eps=1e-5, backend=None):
    """U-ViT residual step: returns `(x + update, LN(x + update) * weight + bias)`."""
    eps = check_norm_inputs("add_layer_norm", x, update=update, weight=weight, bias=bias, eps=eps)
    name = choose("add_layer_norm", ("x", "update", "weight", "bias"), (x, update, weight, bias), backend)
    if name == "torch" or x.numel() == 0:
        return add_layer_norm_torch(x, update, weight, bias, eps)
    if tracing():
        return add_layer_norm_op(x, update, weight, bias, eps, name)
    return IMPLS["add_layer_norm"][name].apply(x, update, weight, bias, eps)


def adaln(x, shift, scale, eps=1e-6, weight=None, bias=None, backend=None):
    """DiT's `modulate(norm(x), shift, scale)`: `LN(x)[*w+b] * (1 + scale[b]) + shift[b]`.

    x is `[B, L, C]` (or `[B, C]`); shift/scale are `[B, C]`, possibly strided chunks of the adaLN output.
    """
    eps = check_norm_inputs("adaln", x, shift=shift, scale=scale, weight=weight, bias=bias, per_sample=True,
                            eps=eps)
    name = choose("adaln", ("x", "shift", "scale", "weight", "bias"), (x, shift, scale, weight, bias), backend)
    if name == "torch" or x.numel() == 0:
        return adaln_torch(x, shift, scale, eps, weight, bias)
    if tracing():
        return adaln_op(x, shift, scale, eps, weight, bias, name)
    return IMPLS["adaln"][name].apply(x, shift, scale, eps, weight, bias)


def gated_adaln(x, update, gate, shift, scale, eps=1e-6, backend=None):
    """DiT residual + next norm: `(r := x + gate[b] * update, LN(r) * (1 + scale[b]) + shift[b])`."""
    eps = check_norm_inputs("gated_adaln", x, update=update, gate=gate, shift=shift, scale=scale,
                            per_sample=True, eps=eps)
    name = choose("gated_adaln", ("x", "update", "gate", "shift", "scale"), (x, update, gate, shift, scale),
                  backend)
    if name == "torch" or x.numel() == 0:
        return gated_adaln_torch(x, update, gate, shift, scale, eps)
    if tracing():
        return gated_adaln_op(x, update, gate, shift, scale, eps, name)
    return IMPLS["gated_adaln"][name].apply(x, update, gate, shift, scale, eps)

"""Layer-norm family: plain, residual-add, adaLN (per-sample modulation) and gated adaLN.

Definitions (DESIGN.md §4), x: [B, L, C] (or [N, C] for layer_norm / add_layer_norm):
  layer_norm(x, w, b, eps)                    = LN(x) * w + b
  add_layer_norm(x, u, w, b, eps)             = (x + u, LN(x + u) * w + b)
  adaln(x, shift, scale, eps, w=None, b=None) = LN(x)[*w+b] * (1 + scale[b]) + shift[b]
  gated_adaln(x, u, gate, shift, scale, eps)  = (r := x + gate[b] * u, adaln(r, shift, scale, eps))
shift/scale/gate are [B, C] and may be strided chunks of one [B, 6C] tensor. Statistics in fp32.
"""
import torch
import torch.nn.functional as F


def _ln(x, weight, bias, eps, upcast):
    dt = torch.float64 if upcast else torch.float32
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
# Torch backend: native fused F.layer_norm (fp32 statistics for half inputs), outputs in x's dtype
# --------------------------------------------------------------------------------------------------

def layer_norm_torch(x, weight, bias, eps=1e-5):
    """Fast torch path (fused native layer_norm) used as the fallback backend."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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
# Input validation (every backend): errors name the argument and the problem
# --------------------------------------------------------------------------------------------------

def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def check_norm_inputs(op, x, update=None, gate=None, shift=None, scale=None, weight=None, bias=None,
                      per_sample=False):
    """Raise ValueError naming the first bad argument of a norm-family op."""
    if not _is_float_tensor(x):
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a floating-point tensor, got {what}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have a non-empty last dim C, got shape {tuple(x.shape)}")
    if per_sample and x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must be [B, L, C] (or [B, C]), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if update is not None:
        if not _is_float_tensor(update) or update.shape != x.shape:
            raise ValueError(f"{op}: update must be a floating-point tensor of x's shape {tuple(x.shape)}, "
                             f"got {tuple(update.shape) if isinstance(update, torch.Tensor) else update!r}")
        if update.dtype != x.dtype:
            raise ValueError(f"{op}: update dtype {update.dtype} differs from x dtype {x.dtype}")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is None:
            continue
        if not _is_float_tensor(t) or t.shape != (x.shape[0], C):
            raise ValueError(f"{op}: {name} must be a floating-point [B, C] = [{x.shape[0]}, {C}] tensor, "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not _is_float_tensor(t) or t.shape != (C,):
            raise ValueError(f"{op}: {name} must be a floating-point [C] = [{C}] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    for name, t in (("update", update), ("gate", gate), ("shift", shift), ("scale", scale),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


# --------------------------------------------------------------------------------------------------
# Fast backends behind torch.library (see ops/__init__.py for why custom_op and not triton_op)
# --------------------------------------------------------------------------------------------------

def norm_fast(backend, x, *, eps, weight=None, bias=None, update=None, gate=None, shift=None, scale=None):
    """One fused pass of the Triton / CUDA norm kernel -> (residual or None, y), both of x's dtype.

    Outputs are allocated here, contiguous, exactly as the fake impls describe them. A 2-D x with
    per-sample operands is [B, C] (one token per sample), which the kernel sees as [B, 1, C].
    """
    # Dispatch checked last-dim contiguity in eager; a compiled graph could in principle hand the
    # registered op a re-laid-out input, so make it safe here (a no-op in the normal case).
    x, update, gate, shift, scale, weight, bias = (
        t if t is None or t.stride(-1) == 1 else t.contiguous()
        for t in (x, update, gate, shift, scale, weight, bias))
    per_sample = gate is not None or shift is not None
    xs, us = x, update
    if per_sample and x.dim() == 2:
        xs, us = x.unsqueeze(1), None if update is None else update.unsqueeze(1)
    y = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
    r = None if update is None else torch.empty(xs.shape, dtype=x.dtype, device=x.device)
    if backend == "triton":
        from duodiff_fast.kernels.norm import norm_fwd

        norm_fwd(xs, eps=eps, weight=weight, bias=bias, update=us, gate=gate, shift=shift, scale=scale,
                 out=y, residual_out=r)
    elif backend == "cuda":
        from .. import _cpp_lib

        _cpp_lib.get().norm(xs, weight, bias, us, gate, shift, scale, float(eps), y, r)
    else:
        raise ValueError(f"norm_fast: no fast backend named {backend!r}")
    y = y.view(x.shape)
    return (None if r is None else r.view(x.shape)), y


def _new_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("duodiff::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  backend: str) -> torch.Tensor:
    """Registered op: LN(x) * weight + bias."""
    return norm_fast(backend, x, eps=eps, weight=weight, bias=bias)[1]


@torch.library.custom_op("duodiff::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: (x + update, LN(x + update) * weight + bias)."""
    return norm_fast(backend, x, eps=eps, weight=weight, bias=bias, update=update)


@torch.library.custom_op("duodiff::adaln", mutates_args=())
def adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             weight: torch.Tensor | None, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Registered op: LN(x)[*w+b] * (1 + scale[b]) + shift[b]."""
    return norm_fast(backend, x, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale)[1]


@torch.library.custom_op("duodiff::gated_adaln", mutates_args=())
def gated_adaln_op(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                   scale: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: (r := x + gate[b] * update, LN(r) * (1 + scale[b]) + shift[b])."""
    return norm_fast(backend, x, eps=eps, update=update, gate=gate, shift=shift, scale=scale)


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

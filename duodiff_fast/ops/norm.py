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


def layer_norm_torch(x, weight, bias, eps=1e-5):
    """Fast torch path (fused native layer_norm) used as the fallback backend."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

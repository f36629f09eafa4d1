"""The four norm-family implementations of a fast backend, made from one `run` method.

A backend's norm base class defines `run(x, *, eps, weight, bias, update, gate, shift, scale) ->
(residual or None, y)` (one pass of its fused kernel); `register_norm_family(base)` derives and registers
`layer_norm`, `add_layer_norm`, `adaln` and `gated_adaln` from it, each mapping its public argument order
onto the kernel's flags.
"""
from __future__ import annotations

from .._registry import register_impl


def _layer_norm(cls, x, weight, bias, eps):
    return cls.run(x, eps=eps, weight=weight, bias=bias)[1]


def _add_layer_norm(cls, x, update, weight, bias, eps):
    return cls.run(x, eps=eps, weight=weight, bias=bias, update=update)


def _adaln(cls, x, shift, scale, eps, weight=None, bias=None):
    return cls.run(x, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale)[1]


def _gated_adaln(cls, x, update, gate, shift, scale, eps):
    return cls.run(x, eps=eps, update=update, gate=gate, shift=shift, scale=scale)


ADAPTERS = {"layer_norm": _layer_norm, "add_layer_norm": _add_layer_norm, "adaln": _adaln,
            "gated_adaln": _gated_adaln}


def register_norm_family(base) -> dict:
    """Register one subclass of `base` per norm-family op; returns {op: class}."""
    return {op: register_impl(type(f"{base.__name__}_{op}", (base,), {"OP": op, "apply": classmethod(fn)}))
            for op, fn in ADAPTERS.items()}

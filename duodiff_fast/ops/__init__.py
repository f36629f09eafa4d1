"""Public ops. Each has a pure-torch `<op>_ref` beside it.

The fast backends (Triton, CUDA) and the dispatcher plug in behind these names; the signatures are
the contract (DESIGN.md §4) and stay stable.
"""
from .attention import attention_ref, attention_sdpa
from .exit_confidence import exit_confidence_ref
from .norm import adaln_ref, add_layer_norm_ref, gated_adaln_ref, layer_norm_ref, layer_norm_torch


def attention(qkv, scale=None, backend=None):
    """[B, L, 3, H, D] packed qkv -> [B, L, H*D]."""
    return attention_sdpa(qkv, scale)


def layer_norm(x, weight, bias, eps=1e-5, backend=None):
    return layer_norm_torch(x, weight, bias, eps)


def add_layer_norm(x, update, weight, bias, eps=1e-5, backend=None):
    r = x + update
    return r, layer_norm_torch(r, weight, bias, eps)


def adaln(x, shift, scale, eps=1e-6, weight=None, bias=None, backend=None):
    return adaln_ref(x, shift, scale, eps, weight, bias)


def gated_adaln(x, update, gate, shift, scale, eps=1e-6, backend=None):
    return gated_adaln_ref(x, update, gate, shift, scale, eps)


def exit_confidence(h, weight, bias, start=0, backend=None):
    return exit_confidence_ref(h, weight, bias, start)


__all__ = [
    "attention", "attention_ref", "attention_sdpa",
    "layer_norm", "layer_norm_ref", "add_layer_norm", "add_layer_norm_ref",
    "adaln", "adaln_ref", "gated_adaln", "gated_adaln_ref",
    "exit_confidence", "exit_confidence_ref",
]

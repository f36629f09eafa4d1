"""Backend `triton`: the kernels of `duodiff_fast.kernels` (source in `kernels/`), one launcher per module.

Each implementation names the kernel module and launcher it calls (`KERNEL_MODULE`, `LAUNCHER`): the
compile report finds every module's `aot_specs()` from these. On a CPU the kernels run only under
TRITON_INTERPRET=1 (a correctness tool, never chosen automatically), and bf16 attention is refused there
because Triton 3.9's interpreter computes bf16 `tl.dot` wrongly (DESIGN.md §6). Launchers are looked up
on their module at call time, so a test or benchmark may stub them.
"""
from __future__ import annotations

import importlib

import torch

from ._norm import register_norm_family
from .._registry import FAST_DTYPES, Impl, kernel_import_error, register_impl
from ..attention import HEAD_DIMS


class TritonImpl(Impl):
    """The Triton kernels: CUDA tensors on sm_80+ (or the interpreter on CPU), last dims contiguous."""

    BACKEND = "triton"
    SUPPORTED_DTYPES = FAST_DTYPES
    MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 and the tile shapes of the kernels assume Ampere or newer
    NEEDS_LAST_DIM_CONTIGUOUS = True
    KERNEL_MODULE = ""
    LAUNCHER = ""

    @classmethod
    def unavailable_reasons(cls):
        err = kernel_import_error(cls.KERNEL_MODULE, cls.LAUNCHER)
        return [] if err is None else [err]

    @classmethod
    def cpu_reasons(cls, inp):
        if not inp.interpret:
            return [("needs CUDA tensors (inputs are on cpu; set TRITON_INTERPRET=1 before importing triton "
                     "to run the kernels in the interpreter)")]
        return []

    @classmethod
    def launcher(cls):
        # The module is imported once; the launcher is read from it on every call (tests may stub it).
        mod = cls.__dict__.get("_module")
        if mod is None or mod.__name__ != f"duodiff_fast.kernels.{cls.KERNEL_MODULE}":
            mod = importlib.import_module(f"duodiff_fast.kernels.{cls.KERNEL_MODULE}")
            cls._module = mod
        return getattr(mod, cls.LAUNCHER)


@register_impl
class TritonAttention(TritonImpl):
    """Packed-qkv flash attention: full unmasked tiles plus one small masked tail (kernels/attention.py)."""
    OP = "attention"
    SUPPORTED_HEAD_DIMS = HEAD_DIMS
    KERNEL_MODULE, LAUNCHER = "attention", "attention_fwd"

    @classmethod
    def cpu_reasons(cls, inp):
        reasons = super().cpu_reasons(inp)
        if not reasons and inp.tensors[0].dtype == torch.bfloat16:
            # Triton 3.9's interpreter computes tl.dot on bf16 wrongly (DESIGN.md §6).
            reasons.append("the Triton interpreter computes bf16 tl.dot wrongly; use fp16/fp32 on CPU")
        return reasons

    @classmethod
    def apply(cls, qkv, scale):
        B, L, _, H, D = qkv.shape
        out = qkv.new_empty(B, L, H * D)  # (B, L, H*D), the layout the fake impl promises
        cls.launcher()(qkv, scale, out=out)
        return out


class _TritonNorm(TritonImpl):
    """One fused pass of the norm kernel (kernels/norm.py); flags chosen by the operands present."""
    KERNEL_MODULE, LAUNCHER = "norm", "norm_fwd"

    @classmethod
    def run(cls, x, *, eps, weight=None, bias=None, update=None, gate=None, shift=None, scale=None):
        """-> (residual or None, y), contiguous outputs of x's dtype and shape."""
        shape = x.shape
        folded = False
        if gate is not None or shift is not None:
            if x.dim() == 2:  # [B, C]: one token per sample
                x, folded = x.unsqueeze(1), True
                update = None if update is None else update.unsqueeze(1)
        elif x.dim() != 2 and x.dim() != 3:  # fold leading dims: the kernel takes [N, C] or [B, L, C]
            x, folded = x.reshape(-1, shape[-1]), True
            update = None if update is None else update.reshape(-1, shape[-1])
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        r = None if update is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        cls.launcher()(x, eps=eps, weight=weight, bias=bias, update=update, gate=gate, shift=shift, scale=scale,
                       out=y, residual_out=r)
        if folded:
            return (None if r is None else r.view(shape)), y.view(shape)
        return r, y


NORM_IMPLS = register_norm_family(_TritonNorm)


@register_impl
class TritonExitConfidence(TritonImpl):
    """One read of h, two-stage deterministic reduction (kernels/exit_confidence.py)."""
    OP = "exit_confidence"
    KERNEL_MODULE, LAUNCHER = "exit_confidence", "exit_confidence_fwd"

    @classmethod
    def apply(cls, h, weight, bias, start):
        return cls.launcher()(h, weight, bias, start)

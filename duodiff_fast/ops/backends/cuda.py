"""Backend `cuda`: the compiled extension `duodiff_fast._C` (csrc/), found by `duodiff_fast._cpp_lib`.

Each implementation names the `_C` function it calls (`CPP_FUNCTION`); together they are the extension's
contract (`_registry.cuda_functions()`). The functions write into outputs allocated here, on the current
stream.
"""
from __future__ import annotations

import torch

from ._norm import register_norm_family
from .._registry import FAST_DTYPES, Impl, device_capability, register_impl
from ..attention import HEAD_DIMS


class CudaImpl(Impl):
    """The hand-written CUDA C++ kernels: CUDA tensors on sm_80+, last dims contiguous."""

    BACKEND = "cuda"
    SUPPORTED_DTYPES = FAST_DTYPES
    MIN_COMPUTE_CAPABILITY = (8, 0)
    NEEDS_LAST_DIM_CONTIGUOUS = True
    CPP_FUNCTION = ""

    @classmethod
    def unavailable_reasons(cls):
        from ... import _cpp_lib

        reasons = _cpp_lib.unavailable_reasons()
        if not reasons and cls.CPP_FUNCTION in _cpp_lib.missing_ops():
            reasons = [f"duodiff_fast._C has no {cls.CPP_FUNCTION}()"]
        return reasons

    @classmethod
    def device_reasons(cls, inp):
        from ... import _cpp_lib

        reasons = super().device_reasons(inp)
        main = inp.tensors[0]
        if not reasons and _cpp_lib.is_available():
            major, minor = device_capability(main.device_index)
            if _cpp_lib.arch_supported(major, minor) is False:
                reasons.append(f"duodiff_fast._C was built for sm_{'/'.join(_cpp_lib.built_archs())}, "
                               f"cuda:{main.device_index} is sm_{major}{minor}")
        return reasons

    @classmethod
    def lib(cls):
        from ... import _cpp_lib

        return _cpp_lib.get()


@register_impl
class CudaAttention(CudaImpl):
    OP = "attention"
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_HEAD_DIMS = HEAD_DIMS
    CPP_FUNCTION = "attention"

    @classmethod
    def apply(cls, qkv, scale):
        B, L, _, H, D = qkv.shape
        out = qkv.new_empty(B, L, H * D)
        cls.lib().attention(qkv, float(scale), out)
        return out


class _CudaNorm(CudaImpl):
    CPP_FUNCTION = "norm"
    MAX_C = 32768  # the binding's limit on the row width

    @classmethod
    def input_reasons(cls, inp):
        C = inp.tensors[0].last_dim
        return [f"row width C={C} is above the kernel's {cls.MAX_C}"] if C > cls.MAX_C else []

    @classmethod
    def run(cls, x, *, eps, weight=None, bias=None, update=None, gate=None, shift=None, scale=None):
        shape = x.shape
        if gate is not None or shift is not None:
            if x.dim() == 2:
                x = x.unsqueeze(1)
                update = None if update is None else update.unsqueeze(1)
        else:  # the extension takes [B, L, C]: rows of the flattened leading dims as one sample
            x = x.reshape(1, -1, shape[-1])
            update = None if update is None else update.reshape(1, -1, shape[-1])
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        r = None if update is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        cls.lib().norm(x, weight, bias, update, gate, shift, scale, float(eps), y, r)
        return (None if r is None else r.view(shape)), y.view(shape)


NORM_IMPLS = register_norm_family(_CudaNorm)


@register_impl
class CudaExitConfidence(CudaImpl):
    OP = "exit_confidence"
    CPP_FUNCTION = "exit_confidence"

    @classmethod
    def not_supported_reasons(cls, inp):
        # The binding reads the [C, K] weight through any strides (a Linear.weight.t() is fine): only h
        # and bias need a dense last dim.
        reasons = super().not_supported_reasons(inp)
        bad = [m.name for m in inp.tensors if not m.last_dim_contiguous and m.name != "weight"]
        return [r for r in reasons if not r.startswith("last dim of")] + (
            [f"last dim of {', '.join(bad)} is not contiguous"] if bad else [])

    @classmethod
    def apply(cls, h, weight, bias, start):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        cls.lib().exit_confidence(h, weight, bias, int(start), out)
        return out

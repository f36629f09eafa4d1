"""Multi-head attention straight from the packed qkv Linear output.

`qkv` is `[B, L, 3, H, D]` (a view of `Linear(C, 3*H*D)(x).view(B, L, 3, H, D)`); the result is
`[B, L, H*D]`, ready for the output projection. No transpose or copy around the op.
"""
import math

import torch
import torch.nn.functional as F


def _check_qkv(qkv: torch.Tensor):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attention: qkv must be a tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention: qkv must be [B, L, 3, H, D], got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"attention: the last dim of qkv must be contiguous, got strides {qkv.stride()}")
    if not qkv.is_floating_point():
        raise ValueError(f"attention: qkv must be a floating-point tensor, got {qkv.dtype}")
    if qkv.shape[1] < 1 or qkv.shape[-1] < 1:
        raise ValueError(f"attention: qkv needs L >= 1 and D >= 1, got shape {tuple(qkv.shape)}")


def attention_ref(qkv: torch.Tensor, scale: float | None = None, upcast: bool = False) -> torch.Tensor:
    """Plain softmax(q k^T * scale) v. `upcast=True` computes in float64 (the test reference)."""
    _check_qkv(qkv)
    B, L, _, H, D = qkv.shape
    scale = D ** -0.5 if scale is None else scale
    x = qkv.double() if upcast else qkv
    q, k, v = x.unbind(2)  # each (B, L, H, D)
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    p = s.softmax(dim=-1)
    o = torch.einsum("bhlm,bmhd->blhd", p, v)  # (B, L, H, D)
    return o.reshape(B, L, H * D).to(qkv.dtype) if not upcast else o.reshape(B, L, H * D)


def attention_sdpa(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """torch SDPA in the input dtype (no silent upcast); pays the transposes SDPA needs."""
    _check_qkv(qkv)
    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(B, L, H * D)


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


# --------------------------------------------------------------------------------------------------
# Fast backends behind torch.library (see ops/__init__.py for why custom_op and not triton_op)
# --------------------------------------------------------------------------------------------------

def attention_fast(qkv: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Run the Triton or CUDA kernel; `scale` already resolved to a float."""
    B, L, _, H, D = qkv.shape
    if qkv.stride(-1) != 1:  # only a compiled graph's re-laid-out input could get here
        qkv = qkv.contiguous()
    out = qkv.new_empty(B, L, H * D)  # (B, L, H*D), the layout the fake impl promises
    if backend == "triton":
        from duodiff_fast.kernels.attention import attention_fwd

        attention_fwd(qkv, scale, out=out)
    elif backend == "cuda":
        from .. import _cpp_lib

        _cpp_lib.get().attention(qkv, scale, out)
    else:
        raise ValueError(f"attention_fast: no fast backend named {backend!r}")
    return out


@torch.library.custom_op("duodiff::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Registered op: packed qkv [B, L, 3, H, D] -> [B, L, H*D] with the named fast backend."""
    return attention_fast(qkv, scale, backend)


@attention_op.register_fake
def _(qkv, scale, backend):
    B, L, _, H, D = qkv.shape
    return qkv.new_empty(B, L, H * D)

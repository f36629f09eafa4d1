"""Op `attention`: multi-head attention straight from the packed qkv Linear output.

`qkv` is `[B, L, 3, H, D]` (a view of `Linear(C, 3*H*D)(x).view(B, L, 3, H, D)`, last dim contiguous); the
result is `[B, L, H*D]`, ready for the output projection. No transpose or copy around the fast kernels.
Declared here once: validation, float64 reference, torch (SDPA) implementation, fake, examples at the
DESIGN §7 shapes, FLOP/byte model. Fast implementations: `ops/backends/`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import ArgumentError, check_float, describe
from ._registry import IMPLS, OpSpec, TorchImpl, choose, register_impl, register_op, tracing

HEAD_DIMS = frozenset({32, 48, 64, 72, 80, 96, 128})  # what the fast kernels take (DiT-XL / U-ViT-H: 72)


# --------------------------------------------------------------------------------------------------
# Validation and reference
# --------------------------------------------------------------------------------------------------

def _check_qkv(qkv: torch.Tensor):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attention: qkv must be a tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention: qkv must be [B, L, 3, H, D], got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"attention: qkv must be a floating-point tensor, got {qkv.dtype}")
    if qkv.shape[1] < 1 or qkv.shape[-1] < 1:
        raise ValueError(f"attention: qkv needs L >= 1 and D >= 1, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1 and qkv.shape[-1] > 1:
        raise ValueError(f"attention: the last dim of qkv must be contiguous, got strides {qkv.stride()}")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    # The kernels fold log2(e) * scale into exp2: a positive finite number.
    try:
        return check_float(scale, "scale", minimum=0.0, exclusive_minimum=True, where="attention")
    except ArgumentError:
        raise ArgumentError(f"attention: scale must be a positive number, got {describe(scale)}") from None


def attention_ref(qkv: torch.Tensor, scale: float | None = None, upcast: bool = False) -> torch.Tensor:
    """Plain softmax(q k^T * scale) v. `upcast=True` computes in float64 (the test reference)."""
    _check_qkv(qkv)
    B, L, _, H, D = qkv.shape
    scale = _check_scale(scale, D)
    x = qkv.double() if upcast else qkv
    q, k, v = x.unbind(2)  # each (B, L, H, D)
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    p = s.softmax(dim=-1)
    o = torch.einsum("bhlm,bmhd->blhd", p, v)  # (B, L, H, D)
    return o.reshape(B, L, H * D).to(qkv.dtype) if not upcast else o.reshape(B, L, H * D)


def attention_sdpa(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """torch SDPA in the input dtype (no silent upcast); pays the transposes SDPA needs."""
    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(B, L, H * D)


# --------------------------------------------------------------------------------------------------
# Declaration: examples and work model
# --------------------------------------------------------------------------------------------------

# (B, H, L, D): U-ViT-S CIFAR, U-ViT-L ImageNet-256, DiT-XL (D=72), and L >= 1024 (DESIGN §7).
BENCH_SHAPES = [(128, 8, 257, 64), (64, 16, 258, 64), (32, 16, 256, 72), (16, 16, 1026, 64)]
SMALL_SHAPES = [(4, 8, 257, 64), (2, 16, 256, 72)]


def _examples(device, dtype, kind="bench"):
    shapes = {"bench": BENCH_SHAPES, "small": SMALL_SHAPES, "typical": [(2, 8, 257, 64)]}[kind]
    g = torch.Generator(device=device).manual_seed(0)
    return {f"B={B} H={H} L={L} D={D}": (torch.randn(B, L, 3, H, D, device=device, generator=g).to(dtype),)
            for B, H, L, D in shapes}


def _flops(args):
    B, L, _, H, D = args[0].shape
    return 4 * B * H * L * L * D


def _bytes(args):
    qkv = args[0]
    B, L, _, H, D = qkv.shape
    return 4 * B * L * H * D * qkv.element_size()  # q, k, v read once, the output written once


def _head_dim(tensors):
    t = tensors[0] if tensors else None
    return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.dim() == 5 else None


SPEC = register_op(OpSpec(
    name="attention", inputs=("qkv",), summary="softmax(q k^T scale) v from packed [B, L, 3, H, D] -> [B, L, H*D]",
    reference=attention_ref, examples=_examples, flops=_flops, bytes=_bytes, head_dim=_head_dim,
    aliases={"sdpa": "torch"}))


@register_impl
class TorchAttention(TorchImpl):
    """torch SDPA (whichever SDPA backend torch picks), in the input dtype."""
    OP = "attention"

    @staticmethod
    def apply(qkv, scale):
        return attention_sdpa(qkv, scale)


# --------------------------------------------------------------------------------------------------
# torch.library op (one per public op; the backend is a string argument, a trace-time constant)
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("duodiff::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Registered op: packed qkv [B, L, 3, H, D] -> [B, L, H*D] with the named fast backend."""
    if qkv.stride(-1) != 1:  # only a compiled graph's re-laid-out input could get here
        qkv = qkv.contiguous()
    return IMPLS["attention"][backend].apply(qkv, scale)


@attention_op.register_fake
def _(qkv, scale, backend):
    B, L, _, H, D = qkv.shape
    return qkv.new_empty(B, L, H * D)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------

def attention(qkv, scale=None, backend=None):
    """Multi-head attention on packed qkv `[B, L, 3, H, D]` -> `[B, L, H*D]` in qkv's dtype.

    `scale` defaults to D**-0.5. No transpose or copy around the fast kernels. Empty batches (B or H
    of 0) give an empty result on every backend.
    """
    _check_qkv(qkv)
    B, L, _, H, D = qkv.shape
    s = _check_scale(scale, D)
    name = choose("attention", ("qkv",), (qkv,), backend)
    if B == 0 or H == 0:
        return qkv.new_empty(B, L, H * D)
    if name == "torch":
        return attention_sdpa(qkv, None if scale is None else s)
    if tracing():
        return attention_op(qkv, s, name)
    return IMPLS["attention"][name].apply(qkv, s)

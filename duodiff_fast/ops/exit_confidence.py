"""Op `exit_confidence`: mean over tokens l >= start and the K outputs of sigmoid(h @ W + b) -> [B] fp32.

The DuoDiff-code probe is K = 1 (Linear(D -> 1) + sigmoid per token, mean over tokens); the AdaDiff
confidence map is K = p*p*C_img on the image tokens. Declared here once: validation, float64 reference,
torch implementation, fake, examples, byte model. Fast implementations: `ops/backends/`.
"""
from __future__ import annotations

import torch

from .._validate import ArgumentError, check_int, describe
from ._registry import IMPLS, OpSpec, TorchImpl, choose, register_impl, register_op, tracing


def exit_confidence_ref(h, weight, bias, start=0, upcast=False):
    """h: [B, L, C], weight: [C, K], bias: [K] -> [B] float32 (float64 when upcast). Computed in fp32 (or
    fp64) from the operands as given: no 16-bit copy of h, no tf32 rounding of an fp32 weight."""
    if h.dim() != 3:
        raise ValueError(f"exit_confidence: h must be [B, L, C], got {tuple(h.shape)}")
    dt = torch.float64 if upcast else torch.float32
    z = h[:, start:].to(dt) @ weight.to(dt) + bias.to(dt)  # (B, L - start, K)
    return torch.sigmoid(z).mean(dim=(1, 2))


def exit_confidence_torch(h, weight, bias, start=0):
    """Torch backend: the matmul in h's dtype with fp32 accumulation where torch offers it, then fp32."""
    hs = h[:, start:]  # (B, L - start, C), a view
    if h.dtype in (torch.float16, torch.bfloat16) and weight.dtype == h.dtype and h.is_cuda:
        z = (hs @ weight).float()  # tensor cores, fp32 accumulate; no fp32 copy of h
    else:
        z = hs.to(torch.float32) @ weight.to(torch.float32)
    return torch.sigmoid(z + bias.to(torch.float32)).mean(dim=(1, 2))


def check_exit_confidence_inputs(h, weight, bias, start):
    """Raise ValueError naming the first bad argument; returns start as an int."""
    op = "exit_confidence"
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
        what = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{op}: h must be a floating-point [B, L, C] tensor, got {what}")
    _, L, C = h.shape
    if C < 1:
        raise ValueError(f"{op}: h needs C >= 1 channels, got shape {tuple(h.shape)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2 \
            or weight.shape[0] != C:
        what = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a floating-point [C, K] tensor with C = {C}, got {what} "
                         "(a Linear(C, K).weight is [K, C]: pass its .t())")
    K = weight.shape[1]
    if K < 1:
        raise ValueError(f"{op}: weight must have K >= 1 outputs, got shape {tuple(weight.shape)}")
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (K,):
        what = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be a floating-point [K] = [{K}] tensor, got {what}")
    try:
        start = check_int(start, "start")
    except ArgumentError:
        raise ArgumentError(f"{op}: start must be an int in [0, L) = [0, {L}), got {describe(start)}") from None
    if not 0 <= start < L:
        raise ArgumentError(f"{op}: start must be an int in [0, L) = [0, {L}), got {start}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != h.device:
            raise ValueError(f"{op}: {name} is on {t.device}, h on {h.device}")
    return start


# (B, L, C, K): the DuoDiff probe (K = 1) and AdaDiff maps (K = p*p*C_img) at U-ViT-S and DiT-XL widths.
BENCH_SHAPES = [(128, 257, 512, 1), (128, 257, 512, 12), (32, 256, 1152, 1), (32, 256, 1152, 16),
                (256, 256, 1152, 1), (256, 256, 1152, 16)]
SMALL_SHAPES = [(8, 257, 512, 1), (4, 256, 1152, 16)]


def _examples(device, dtype, kind="bench"):
    shapes = {"bench": BENCH_SHAPES, "small": SMALL_SHAPES, "typical": [(2, 257, 512, 1)]}[kind]
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for B, L, C, K in shapes:
        h = torch.randn(B, L, C, device=device, generator=g).to(dtype)
        w = (torch.randn(C, K, device=device, generator=g) / C ** 0.5).to(dtype)
        b = torch.randn(K, device=device, generator=g).to(dtype)
        # start=1: skip the time token, as the probes do
        out[f"B={B} L={L} C={C} K={K} ({h.numel() * h.element_size() / 2**20:.1f} MiB h)"] = (h, w, b, 1)
    return out


def _bytes(args):
    h, w = args[0], args[1]
    return h.numel() * h.element_size() + w.numel() * w.element_size() + 4 * h.shape[0]


def _flops(args):
    h, w = args[0], args[1]
    B, L, C = h.shape
    return 2 * B * L * C * w.shape[1]


SPEC = register_op(OpSpec(
    name="exit_confidence", inputs=("h", "weight", "bias"),
    summary="mean over tokens >= start and K outputs of sigmoid(h W + b) -> [B] fp32",
    reference=exit_confidence_ref, examples=_examples, bytes=_bytes, flops=_flops))


@register_impl
class TorchExitConfidence(TorchImpl):
    OP = "exit_confidence"
    apply = staticmethod(exit_confidence_torch)


@torch.library.custom_op("duodiff::exit_confidence", mutates_args=())
def exit_confidence_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, start: int,
                       backend: str) -> torch.Tensor:
    """Registered op: mean over tokens l >= start and K outputs of sigmoid(h @ weight + bias) -> [B] fp32."""
    if h.stride(-1) != 1:  # only a compiled graph's re-laid-out input could get here
        h = h.contiguous()
    return IMPLS["exit_confidence"][backend].apply(h, weight, bias, start)


@exit_confidence_op.register_fake
def _(h, weight, bias, start, backend):
    return h.new_empty(h.shape[0], dtype=torch.float32)


def exit_confidence(h, weight, bias, start=0, backend=None):
    """Early-exit confidence `[B]` float32: mean over tokens `l >= start` and the K outputs of
    `sigmoid(h[b, l] @ weight + bias)`; h `[B, L, C]`, weight `[C, K]`, bias `[K]`. The value for one
    sample does not depend on the other samples of the batch (no batch-dependent blocking)."""
    start = check_exit_confidence_inputs(h, weight, bias, start)
    name = choose("exit_confidence", ("h", "weight", "bias"), (h, weight, bias), backend)
    if h.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=h.device)
    if name == "torch":
        return exit_confidence_torch(h, weight, bias, start)
    if tracing():
        return exit_confidence_op(h, weight, bias, start, name)
    return IMPLS["exit_confidence"][name].apply(h, weight, bias, start)

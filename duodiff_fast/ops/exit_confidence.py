"""Early-exit confidence: mean over tokens l >= start and the K outputs of sigmoid(h @ W + b)."""
import torch


def exit_confidence_ref(h, weight, bias, start=0, upcast=False):
    """h: [B, L, C], weight: [C, K], bias: [K] -> [B] float32 (float64 when upcast)."""
    if h.dim() != 3:
        raise ValueError(f"exit_confidence: h must be [B, L, C], got {tuple(h.shape)}")
    dt = torch.float64 if upcast else torch.float32
    z = h[:, start:].to(dt) @ weight.to(dt) + bias.to(dt)  # (B, L - start, K)
    return torch.sigmoid(z).mean(dim=(1, 2))


def check_exit_confidence_inputs(h, weight, bias, start):
    """Raise ValueError naming the first bad argument."""
    op = "exit_confidence"
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
        what = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{op}: h must be a floating-point [B, L, C] tensor, got {what}")
    _, L, C = h.shape
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2 \
            or weight.shape[0] != C:
        what = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a floating-point [C, K] tensor with C = {C}, got {what} "
                         "(a Linear(C, K).weight is [K, C]: pass its .t())")
    K = weight.shape[1]
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (K,):
        what = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be a floating-point [K] = [{K}] tensor, got {what}")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < L:
        raise ValueError(f"{op}: start must be an int in [0, L) = [0, {L}), got {start!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != h.device:
            raise ValueError(f"{op}: {name} is on {t.device}, h on {h.device}")


def exit_confidence_fast(h, weight, bias, start, backend):
    """Run the Triton or CUDA kernel -> [B] float32."""
    if h.stride(-1) != 1:  # only a compiled graph's re-laid-out input could get here
        h = h.contiguous()
    if backend == "triton":
        from duodiff_fast.kernels.exit_confidence import exit_confidence_fwd

        return exit_confidence_fwd(h, weight, bias, start)
    if backend == "cuda":
        from .. import _cpp_lib

        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        _cpp_lib.get().exit_confidence(h, weight, bias, start, out)
        return out
    raise ValueError(f"exit_confidence_fast: no fast backend named {backend!r}")


@torch.library.custom_op("duodiff::exit_confidence", mutates_args=())
def exit_confidence_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, start: int,
                       backend: str) -> torch.Tensor:
    """Registered op: mean over tokens l >= start and K outputs of sigmoid(h @ weight + bias) -> [B] fp32."""
    return exit_confidence_fast(h, weight, bias, start, backend)


@exit_confidence_op.register_fake
def _(h, weight, bias, start, backend):
    return h.new_empty(h.shape[0], dtype=torch.float32)

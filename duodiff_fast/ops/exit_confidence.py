"""Early-exit confidence: mean over tokens l >= start and the K outputs of sigmoid(h @ W + b)."""
import torch


def exit_confidence_ref(h, weight, bias, start=0, upcast=False):
    """h: [B, L, C], weight: [C, K], bias: [K] -> [B] float32 (float64 when upcast)."""
    if h.dim() != 3:
        raise ValueError(f"exit_confidence: h must be [B, L, C], got {tuple(h.shape)}")
    dt = torch.float64 if upcast else torch.float32
    z = h[:, start:].to(dt) @ weight.to(dt) + bias.to(dt)  # (B, L - start, K)
    return torch.sigmoid(z).mean(dim=(1, 2))

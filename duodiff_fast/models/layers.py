"""Layers that U-ViT and DiT share, and the block-iteration state both families expose.

Both models have a public `embed(x, t, y) -> Tokens`, `block_step(tokens) -> Tokens` (runs one block),
`iter_blocks(tokens)` (yields the state before every block and after the last) and `head(tokens)`, so
that wrappers (early-exit heads, caching, graph capture) compose a model instead of copying its forward
loop. On the inference path (`fast_path()`: no_grad / inference_mode) a block's last residual add is
fused with the LayerNorm of whatever reads the stream next, and `Tokens.h` carries that normalised input
from one step to the next; with gradients `h` is None and every block runs plain torch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from duodiff_fast import ops
from duodiff_fast.conventions import TIME_CONVENTIONS, check_time_convention  # noqa: F401  (re-exported)
from duodiff_fast.conventions import label_range as _label_range


#################################################################################
#                                Block iteration                                #
#################################################################################

class Tokens(NamedTuple):
    """The state between blocks: `x` the residual stream (B, N, D); `h` x normalised for the next reader
    (the fused path's by-product; None when not computed); `index` the number of blocks already run; `cond`
    per-sample conditioning (DiT's c = t_emb + y_emb, None for U-ViT); `aux` family-specific carry (U-ViT:
    the long-skip stack; DiT: the adaLN chunks of the next block)."""
    x: torch.Tensor
    h: torch.Tensor | None
    index: int
    cond: torch.Tensor | None = None
    aux: tuple = ()


def iter_blocks(model, tokens: Tokens):
    """Yield `tokens` before each block runs (index 0 .. n-1) and after the last one (index n). A consumer
    that stops iterating runs no further block (early exit saves that compute)."""
    yield tokens
    while tokens.index < model.num_blocks:
        tokens = model.block_step(tokens)
        yield tokens


#################################################################################
#                            Embeddings and helpers                             #
#################################################################################

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim) float32, [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the token layout is (p1, p2, C) like both upstreams."""
    B, L, PPC = x.shape
    h = w = int(round(L ** 0.5))
    p = int(round((PPC // channels) ** 0.5))
    if h * w != L or p * p * channels != PPC:
        raise ValueError(f"unpatchify: cannot split {tuple(x.shape)} into a square grid of "
                         f"{channels}-channel patches")
    x = x.reshape(B, h, w, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def as_batch_timesteps(t, batch: int, device) -> torch.Tensor:
    """Accept a python number, a 0-dim or a (B,) tensor; return (B,)."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    return t


def resolve_null_class(null_class, num_classes: int, default):
    if null_class == "auto":
        return default if num_classes > 0 else None
    return null_class


def model_label_range(model) -> int:
    """[0, label_range) are a model's real class labels (see conventions.label_range)."""
    return _label_range(getattr(model, "num_classes", 0), getattr(model, "null_class", None))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided conv: (B, C, H, W) -> (B, H*W/p^2, D)."""

    def __init__(self, patch_size, in_chans=3, embed_dim=768, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not divisible by patch size {self.patch_size}")
        # (B, L, D) with D contiguous: the fused norm kernels read rows along the channel dim
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, hidden) through a 256-d sinusoidal embedding and a SiLU MLP (DiT)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, hidden)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, hidden). With dropout_prob > 0 there is one extra row (index num_classes),
    the null label that classifier-free guidance uses; in training labels are dropped to it (DiT)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def modulate(x, shift, scale):
    """x (B, L, C) * (1 + scale (B, C)) + shift (B, C), broadcast over tokens (DiT's adaLN)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                          Attention, MLP, fused norms                          #
#################################################################################

_TORCH_PATH = False


def fast_path() -> bool:
    """The ops path runs whenever no gradient is being recorded (no_grad or inference_mode), unless
    `torch_path()` is active."""
    return not torch.is_grad_enabled() and not _TORCH_PATH


class torch_path:
    """`with torch_path():` run every block the way the official code does (plain LayerNorm, SDPA on
    transposed q/k/v, separate residual adds), also without gradients: the baseline of the benchmarks and
    of the launch count. Not thread-local: meant for benchmarking, not for concurrent sampling."""

    def __enter__(self):
        global _TORCH_PATH
        self._previous, _TORCH_PATH = _TORCH_PATH, True
        return self

    def __exit__(self, *exc):
        global _TORCH_PATH
        _TORCH_PATH = self._previous
        return False


def sdpa_packed(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """Training path attention: (B, L, 3, H, D) -> (B, L, H*D) with torch SDPA, in the input dtype."""
    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, L, D)
    return o.transpose(1, 2).reshape(B, L, H * D)


class Attention(nn.Module):
    """Multi-head self-attention from one packed qkv Linear (timm's parameter names: qkv, proj).

    U-ViT builds it without a qkv bias, DiT with one. Inference runs `ops.attention` on the packed view
    (no transposes, never an fp32 upcast); with gradients, torch SDPA on the same view."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Official U-ViT's flash mode ignores qk_scale (SDPA default); its math mode honours it. Every
        # official config leaves it None, where both agree with this.
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, D), no copy
        if fast_path():
            o = ops.attention(qkv, self.scale)  # (B, L, C)
        else:
            o = sdpa_packed(qkv, self.scale)  # (B, L, C)
        return self.proj(o)


class Mlp(nn.Module):
    """fc1 -> act -> fc2 (parameter names as timm's Mlp)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _is_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def norm_fast(norm: nn.Module, x):
    """norm(x) through `ops.layer_norm` when it is a LayerNorm (else the module itself)."""
    if _is_layer_norm(norm):
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)  # a custom norm_layer: nothing to fuse


def add_norm_fast(norm: nn.Module, x, update):
    """(x + update, norm(x + update)); one fused pass when norm is a LayerNorm."""
    if _is_layer_norm(norm):
        return ops.add_layer_norm(x, update, norm.weight, norm.bias, norm.eps)
    x = x + update
    return x, norm(x)

"""Early-exit heads on a frozen U-ViT or DiT: the baseline DuoDiff compares itself with.

`EarlyExitModel(backbone, variant)` composes the backbone's public pieces (`embed`, `block_step` /
`iter_blocks`, `head`): it never copies a block loop. An *exit* `i` (1 <= i < num_blocks) means "stop
after i blocks": a probe scores the residual stream at the input of block i, and an output head turns
that stream into eps. The backbone's own head is the last exit (i = num_blocks).

Two published variants (DESIGN.md §2):
- 'duodiff' (the DuoDiff / DeeDiff code): per exit a probe Linear(D -> 1) + sigmoid on every token,
  mean-pooled over all tokens, gives an *uncertainty* u_i in [0, 1] per sample; a head per exit
  (LayerNorm -> Linear -> drop the condition tokens -> unpatchify [-> 3x3 conv, as the U-ViT head]).
  A sample may exit at i when u_i <= threshold (0.05..0.1 in the paper).
- 'adadiff' (AdaDiff): per exit a map Linear(D -> p*p*C) + sigmoid on the image tokens gives a per-pixel
  *confidence*; its mean c_i in [0, 1] per sample; one output head shared by all exits. A sample may exit
  at i when c_i >= threshold (0.9..0.95 in AdaDiff's code).
The score is computed by `ops.exit_confidence` (one read of the tokens, deterministic, batch-independent).
`passes(score, threshold)` states the rule once; `EXIT_RULES` names it per variant.

Training with the backbone frozen (`exit_losses`): with g_i the exit-i eps and eps the true noise,
u_hat_i = mean tanh|g_i - eps| (the per-sample target uncertainty), MSE_i = mean (g_i - eps)^2:
  'duodiff': L = sum_i mean_batch (u_i - u_hat_i)^2 + sum_i mean_batch [(1 - u_hat_i) MSE_i]   (L_u + L_UAL)
  'adadiff': L = sum_i mean (c_map_i - (1 - tanh|g_i - eps|))^2 + sum_i mean_batch [(1 - u_hat_i) MSE_i]
(the per-pixel confidence map is fitted to one minus the per-pixel error, in token layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from duodiff_fast import ops

from .layers import Tokens, unpatchify

VARIANTS = ("duodiff", "adadiff")
# What the score is and which side of the threshold lets a sample exit.
EXIT_RULES = {"duodiff": "uncertainty u <= threshold", "adadiff": "confidence c >= threshold"}


def passes(variant: str, score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean [B]: whether each sample may exit, for `variant`'s score (see EXIT_RULES). The boundary
    counts as passing on both sides: u == threshold exits, c == threshold exits."""
    if variant == "duodiff":
        return score <= threshold
    if variant == "adadiff":
        return score >= threshold
    raise ValueError(f"unknown early-exit variant {variant!r}; choose one of {VARIANTS}")


def _family(backbone) -> str:
    from .dit import DiT
    from .uvit import UViT
    if isinstance(backbone, UViT):
        return "uvit"
    if isinstance(backbone, DiT):
        return "dit"
    raise TypeError(f"EarlyExitModel wraps a U-ViT or a DiT from duodiff_fast.models, got {type(backbone).__name__}")


class ExitHead(nn.Module):
    """Tokens (B, N, D) -> eps (B, C, H, W): LayerNorm -> Linear(D -> p*p*C) -> drop the condition tokens
    -> unpatchify [-> 3x3 conv]."""

    def __init__(self, dim, patch_size, channels, extras, conv):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None
        self.channels, self.extras = channels, extras

    def forward(self, x):
        x = self.proj(self.norm(x))[:, self.extras:]  # (B, L, p*p*C)
        x = unpatchify(x, self.channels)  # (B, C, H, W)
        return self.conv(x) if self.conv is not None else x


class Probe(nn.Module):
    """sigmoid(h W + b) averaged over tokens >= start and the K outputs -> [B] (ops.exit_confidence). The
    weight is stored [D, K] (what the op reads, no transpose)."""

    def __init__(self, dim, k, start):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, k))
        self.bias = nn.Parameter(torch.zeros(k))
        self.start = start
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    def forward(self, h):
        return ops.exit_confidence(h, self.weight.to(h.dtype), self.bias.to(h.dtype), self.start)

    def map(self, h):
        """Per-token, per-output sigmoid (B, N - start, K), differentiable (training)."""
        z = h[:, self.start:].float() @ self.weight.float() + self.bias.float()
        return torch.sigmoid(z)


class EarlyExitModel(nn.Module):
    """A frozen backbone with a probe and an output head per exit (see the module docstring).

    `forward(x, t, y)` is the backbone's full output (so the wrapper still samples like the backbone).
    """

    def __init__(self, backbone: nn.Module, variant: str = "duodiff"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown early-exit variant {variant!r}; choose one of {VARIANTS}")
        fam = _family(backbone)
        self.backbone = backbone.requires_grad_(False).eval()
        self.variant, self.family = variant, fam
        D = backbone.embed_dim if fam == "uvit" else backbone.hidden_size
        p, C = backbone.patch_size, backbone.in_channels
        self.extras = backbone.extras if fam == "uvit" else 0
        conv = fam == "uvit" and isinstance(backbone.final_layer, nn.Conv2d)
        self.exits = list(range(1, backbone.num_blocks))  # exit i: after i blocks; the last is the backbone's
        n = len(self.exits)
        if variant == "duodiff":
            self.probes = nn.ModuleList([Probe(D, 1, 0) for _ in range(n)])
            self.heads = nn.ModuleList([ExitHead(D, p, C, self.extras, conv) for _ in range(n)])
        else:
            self.probes = nn.ModuleList([Probe(D, p * p * C, self.extras) for _ in range(n)])
            self.shared_head = ExitHead(D, p, C, self.extras, conv)
        self.patch_size, self.channels = p, C
        # Attributes samplers read, as on the backbone.
        for name in ("img_size", "in_channels", "num_classes", "null_class", "time_convention", "schedule_spec",
                     "cfg_channels", "depth_blocks"):
            if hasattr(backbone, name):
                setattr(self, name, getattr(backbone, name))

    # ---- pieces ------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def head(self, i: int):
        """Output head of exit i (1 <= i < num_blocks)."""
        k = i - 1
        return self.heads[k] if self.variant == "duodiff" else self.shared_head

    def score(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[B] float32 score of exit i on the stream x (u for 'duodiff', c for 'adadiff')."""
        return self.probes[i - 1](x)

    def exit_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """eps (B, C, H, W) of exit i from the stream x."""
        return self.head(i)(x.to(next(self.head(i).parameters()).dtype))[:, : self.channels]

    def final_output(self, tok: Tokens) -> torch.Tensor:
        return self.backbone.head(tok)[:, : self.channels]

    def embed(self, x, t, y=None) -> Tokens:
        return self.backbone.embed(x, t, y) if y is not None or self.family == "dit" else self.backbone.embed(x, t)

    def forward(self, x, t, y=None):
        return self.backbone(x, t, y) if y is not None or self.family == "dit" else self.backbone(x, t)

    # ---- every exit at once (training, per-sample sampling, profiles) ------------------------------------
    def all_exits(self, x, t, y=None, with_maps=False):
        """Run all blocks; returns (streams {i: x_i}, final eps). Streams are detached (frozen backbone)."""
        streams = {}
        with torch.no_grad():
            tok = self.embed(x, t, y)
            for step in self.backbone.iter_blocks(tok):
                if step.index in self.exits:
                    streams[step.index] = step.x.detach()
                last = step
            final = self.final_output(last)
        return streams, final

    def exit_losses(self, x, t, y, eps) -> dict:
        """The variant's training loss on one batch (see the module docstring): dict(loss, l_score, l_ual,
        mse per exit (list), u_hat per exit (list))."""
        streams, _ = self.all_exits(x, t, y)
        l_score = x.new_zeros(())
        l_ual = x.new_zeros(())
        mses, uhats = [], []
        for i in self.exits:
            h = streams[i]
            g = self.exit_output(i, h).float()  # (B, C, H, W)
            err = (g - eps).abs()
            u_hat = torch.tanh(err).flatten(1).mean(1).detach()  # (B,)
            mse = (g - eps).pow(2).flatten(1).mean(1)  # (B,)
            l_ual = l_ual + ((1.0 - u_hat) * mse).mean()
            probe = self.probes[i - 1]
            if self.variant == "duodiff":
                u = probe.map(h).mean(dim=(1, 2))  # (B,)
                l_score = l_score + (u - u_hat).pow(2).mean()
            else:
                c_map = probe.map(h)  # (B, L, p*p*C) on image tokens
                target = 1.0 - torch.tanh(err).detach()  # (B, C, H, W) -> token layout (B, L, p*p*C)
                l_score = l_score + (c_map - _patchify(target, self.patch_size)).pow(2).mean()
            mses.append(float(mse.detach().mean()))
            uhats.append(float(u_hat.mean()))
        return dict(loss=l_score + l_ual, l_score=l_score.detach(), l_ual=l_ual.detach(), mse=mses, u_hat=uhats)

    def exit_state_dict(self) -> dict:
        """The trainable tensors only (probes and heads): what exit checkpoints store."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_exit_state_dict(self, sd: dict, strict: bool = True):
        """Load probes and heads (strict: every exit tensor present, none extra, shapes equal)."""
        own = self.exit_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if strict and (missing or unexpected) or shapes:
            raise ValueError(f"exit heads do not match this {self.family} backbone ({self.variant}, "
                             f"{len(self.exits)} exits): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"wrongly shaped {shapes[:5]}")
        full = dict(self.state_dict())
        full.update(sd)
        self.load_state_dict(full, strict=True)
        return self


def _patchify(img, p):
    """(B, C, H, W) -> (B, h*w, p*p*C) with the (p1, p2, C) token layout of unpatchify."""
    B, C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)

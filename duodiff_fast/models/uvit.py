"""U-ViT: a ViT denoiser with long skip connections (Bao et al., "All are Worth Words", CVPR 2023).

Same constructor keywords, parameter names and outputs as the official `libs/uvit.py`, so released
checkpoints load with `strict=True`. Tokens are [label?, time, patches]; depth//2 in-blocks push
their outputs on a stack, one mid block, depth//2 out-blocks pop it (LIFO) and mix it in with
Linear(2C -> C). Pre-LN blocks, GELU MLP, no adaLN.

Two paths through every block:
- gradients enabled: plain torch (SDPA in the input dtype, F.layer_norm), for training;
- no_grad / inference_mode: `duodiff_fast.ops` (packed-qkv attention, residual add fused with the
  next LayerNorm), the path that the Triton/CUDA backends accelerate.
Unlike the official code, attention never upcasts to fp32 (that rules out the fast kernels).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from duodiff_fast import ops

TIME_CONVENTIONS = ("int", "frac1000", "cont999")


#################################################################################
#                          Shared layers (also used by DiT)                     #
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


class Mlp(nn.Module):
    """fc1 -> act -> fc2 (parameter names as timm's Mlp)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def sdpa_packed(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """Training path attention: (B, L, 3, H, D) -> (B, L, H*D) with torch SDPA, in the input dtype."""
    B, L, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, L, D)
    return o.transpose(1, 2).reshape(B, L, H * D)


def fast_path() -> bool:
    """The ops path runs whenever no gradient is being recorded (no_grad or inference_mode)."""
    return not torch.is_grad_enabled()


def _is_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def norm_fast(norm: nn.Module, x):
    if _is_layer_norm(norm):
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)  # a custom norm_layer: nothing to fuse


def add_norm_fast(norm: nn.Module, x, update):
    """(x + update, norm(x + update)); one fused pass when norm is a LayerNorm."""
    if _is_layer_norm(norm):
        return ops.add_layer_norm(x, update, norm.weight, norm.bias, norm.eps)
    x = x + update
    return x, norm(x)


#################################################################################
#                                 U-ViT blocks                                  #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention from one packed qkv Linear."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Official flash mode ignores qk_scale (SDPA default); its math mode honours it. Every official
        # config leaves it None, where both agree with this.
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


class Block(nn.Module):
    """Pre-LN transformer block; an out-block first merges its long skip: Linear(cat[x, skip])."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, skip=False, use_checkpoint=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x, skip=None):
        """Torch path (what the official block computes)."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, 2C) -> (B, L, C)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x

    def forward_fused(self, x, h=None, skip=None, next_norm=None):
        """Inference path. `h` is norm1(x) if the previous block already produced it (fused with its
        residual add). Returns (x_out, next_norm(x_out)), the second None when next_norm is None."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, C)
            h = None
        if h is None:
            h = norm_fast(self.norm1, x)
        x, h = add_norm_fast(self.norm2, x, self.attn(h))  # residual + norm2 in one pass
        u = self.mlp(h)
        if next_norm is None:
            return x + u, None
        return add_norm_fast(next_norm, x, u)  # residual + the next consumer's norm


#################################################################################
#                                     U-ViT                                     #
#################################################################################

class UViT(nn.Module):
    """U-ViT denoiser: forward(x (B, C, H, W), timesteps (B,), y (B,) or None) -> (B, C, H, W).

    Extra keywords beyond the official ones: `time_convention` ('int' | 'frac1000' | 'cont999', how the
    sampler must scale t before calling; the model itself takes t as given) and `null_class` (the label
    of the unconditional branch for classifier-free guidance; 'auto' = num_classes - 1, the official
    convention of training with 1001 labels where label 1000 means "no class").

    `cfg_channels = None`: the official sampler guides every output channel.
    """

    cfg_channels = None
    recommended_cfg_scale = None  # set by create_model from the preset

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False,
                 num_classes=-1, use_checkpoint=False, conv=True, skip=True, *,
                 time_convention="int", null_class="auto"):
        super().__init__()
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS}, got {time_convention!r}")
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = self.in_channels = self.out_channels = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = max(num_classes, 0)  # official uses -1 for "unconditional"
        self.null_class = resolve_null_class(null_class, self.num_classes, self.num_classes - 1)
        self.time_convention = time_convention
        self.depth_blocks = depth // 2 * 2 + 1

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
        self.extras = 2 if self.num_classes > 0 else 1  # condition tokens in front of the patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     qk_scale=qk_scale, norm_layer=norm_layer, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=skip) for _ in range(depth // 2)])

        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: truncated normal(0.02) for Linear weights and pos_embed, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def embed(self, x, timesteps, y=None):
        """(B, C, H, W) -> tokens (B, extras + L, D) with position embedding added."""
        x = self.patch_embed(x)  # (B, L, D)
        B = x.shape[0]
        t = as_batch_timesteps(timesteps, B, x.device)
        # The embedding is float32 (as upstream); cast so a half-precision model stays in its dtype.
        t_emb = timestep_embedding(t, self.embed_dim).to(x.dtype)
        tokens = [self.time_embed(t_emb).unsqueeze(1), x]  # (B, 1, D), (B, L, D)
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("this U-ViT is unconditional (num_classes <= 0) but got labels y")
            tokens.insert(0, self.label_emb(y).unsqueeze(1))  # (B, 1, D)
        elif self.num_classes > 0:
            raise ValueError(f"this U-ViT is class-conditional ({self.num_classes} labels): pass y "
                             f"(null_class={self.null_class} for the unconditional branch)")
        return torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + L, D)

    def head(self, x):
        """Normalised tokens (B, extras + L, D) -> image (B, C, H, W)."""
        x = self.decoder_pred(x)[:, self.extras:]  # (B, L, p*p*C)
        return self.final_layer(unpatchify(x, self.in_chans))  # (B, C, H, W)

    def forward(self, x, timesteps, y=None):
        x = self.embed(x, timesteps, y)
        if fast_path():
            return self.head(self._blocks_fused(x))
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        return self.head(self.norm(x))

    def _blocks_fused(self, x):
        # Each block ends with its residual add fused into the LayerNorm of whatever reads x next:
        # the next block's norm1 (when that block has no skip Linear in front) or the final norm.
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        n_in = len(self.in_blocks)
        skips, h = [], None
        for i, blk in enumerate(blocks):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if nxt is None:
                next_norm = self.norm
            else:
                next_norm = nxt.norm1 if nxt.skip_linear is None else None
            skip = skips.pop() if i > n_in else None
            x, h = blk.forward_fused(x, h, skip, next_norm)
            if i < n_in:
                skips.append(x)
        return h  # (B, extras + L, D) = self.norm(x)

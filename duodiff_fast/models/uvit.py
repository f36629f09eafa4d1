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
import torch
import torch.nn as nn
import torch.utils.checkpoint

from .layers import (Attention, Mlp, PatchEmbed, Tokens, add_norm_fast, as_batch_timesteps, check_time_convention,
                     fast_path, iter_blocks, model_label_range, norm_fast, resolve_null_class, timestep_embedding,
                     unpatchify)

#################################################################################
#                                 U-ViT blocks                                  #
#################################################################################

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
    convention of training with 1001 labels where label 1000 means "no class"), and `pos_embed_std` (the
    init std of the position table, official 0.02; it only matters for training from scratch).

    Why `pos_embed_std` exists: the head is a per-token LayerNorm then a linear map, so at init every
    patch token leaves with the same norm. At high noise an eps-predictor must return its input, whose
    per-patch norm varies (about 10% for a 48-value patch), and until the net has learned a large constant
    in its residual stream it cannot: measured on a 1500-step demo model, its t=999 outputs pointed the right
    way (cosine 0.999) with a 0.9% norm spread against the input's 10%, and the eps error that left (0.0117)
    becomes an x0 error of about 17 at t=999. A position table of std 1.0 is that constant from step 0,
    so the final LayerNorm's scale is set by position, not by the noise (the demo preset uses it).

    `cfg_channels = None`: the official sampler guides every output channel.
    """

    cfg_channels = None
    recommended_cfg_scale = None  # set by create_model from the preset

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False,
                 num_classes=-1, use_checkpoint=False, conv=True, skip=True, *,
                 time_convention="int", null_class="auto", pos_embed_std=0.02):
        super().__init__()
        check_time_convention(time_convention)
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = self.in_channels = self.out_channels = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = max(num_classes, 0)  # official uses -1 for "unconditional"
        self.null_class = resolve_null_class(null_class, self.num_classes, self.num_classes - 1)
        self.time_convention = time_convention
        if not (isinstance(pos_embed_std, (int, float)) and not isinstance(pos_embed_std, bool)
                and 0 < pos_embed_std < float("inf")):
            raise ValueError(f"UViT: pos_embed_std must be a positive number, got {pos_embed_std!r}")
        self.pos_embed_std = float(pos_embed_std)
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
        """Official init: truncated normal(0.02) for Linear weights and pos_embed, zero biases (pos_embed:
        `pos_embed_std`, truncated at 2 std)."""
        if self.pos_embed_std == 0.02:
            nn.init.trunc_normal_(self.pos_embed, std=.02)  # the official call, bit for bit
        else:
            s = self.pos_embed_std
            nn.init.trunc_normal_(self.pos_embed, std=s, a=-2 * s, b=2 * s)
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

    # ---- public pieces: embed, block iteration, head (early-exit heads and graphs compose these) ------
    @property
    def label_range(self) -> int:
        """Real class labels are [0, label_range) (the null class of guidance excluded)."""
        return model_label_range(self)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in running order: in-blocks, the mid block, out-blocks."""
        return len(self.in_blocks) + 1 + len(self.out_blocks)

    def block(self, i: int) -> "Block":
        n_in = len(self.in_blocks)
        if i < n_in:
            return self.in_blocks[i]
        return self.mid_block if i == n_in else self.out_blocks[i - n_in - 1]

    def embed(self, x, timesteps, y=None) -> Tokens:
        """(B, C, H, W) -> the state before block 0: tokens (B, extras + L, D) with position embedding
        (and, on the inference path, block 0's norm1 of them)."""
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
        x = torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + L, D)
        return Tokens(x, None, 0, None, ())

    def block_step(self, tok: Tokens) -> Tokens:
        """Run block `tok.index`. In-blocks push their output on the long-skip stack (`aux`), out-blocks
        pop it (LIFO). Inference path: the block's last residual add is fused with the LayerNorm of the
        next reader (the next block's norm1 unless it has a skip Linear first, or the final norm)."""
        i, n_in = tok.index, len(self.in_blocks)
        blk = self.block(i)
        skips = tok.aux
        skip = None
        if i > n_in:
            skip, skips = skips[-1], skips[:-1]
        if fast_path():
            if i + 1 < self.num_blocks:
                nxt = self.block(i + 1)
                next_norm = nxt.norm1 if nxt.skip_linear is None else None
            else:
                next_norm = self.norm
            x, h = blk.forward_fused(tok.x, tok.h, skip, next_norm)
        else:
            x, h = blk(tok.x, skip), None
        if i < n_in:
            skips = skips + (x,)
        return Tokens(x, h, i + 1, None, skips)

    def iter_blocks(self, tok: Tokens):
        """Yield the state before every block and after the last (see layers.iter_blocks)."""
        return iter_blocks(self, tok)

    def head(self, tok) -> torch.Tensor:
        """Final state (or normalised tokens (B, extras + L, D)) -> image (B, C, H, W): final norm, Linear
        to patches, drop the condition tokens, unpatchify, 3x3 conv."""
        if isinstance(tok, Tokens):
            h = tok.h if tok.h is not None else self.norm(tok.x)
        else:
            h = tok
        x = self.decoder_pred(h)[:, self.extras:]  # (B, L, p*p*C)
        return self.final_layer(unpatchify(x, self.in_chans))  # (B, C, H, W)

    def forward(self, x, timesteps, y=None):
        tok = self.embed(x, timesteps, y)
        for _ in range(self.num_blocks):  # a plain loop: torch.compile traces it without graph breaks
            tok = self.block_step(tok)
        return self.head(tok)

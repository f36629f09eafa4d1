"""DiT: class-conditional diffusion transformer with adaLN-Zero blocks (Peebles & Xie, ICCV 2023).

Same constructor keywords, parameter names and outputs as the official `models.py`, so released
checkpoints (DiT-XL-2-256x256.pt, ...) load with `strict=True`. Each block is modulated by
c = t_emb + y_emb through a per-block Linear(C -> 6C): shift/scale/gate for attention and MLP.

Two paths through every block:
- gradients enabled: plain torch (SDPA in the input dtype, F.layer_norm), for training;
- no_grad / inference_mode: `duodiff_fast.ops`: packed-qkv attention, `adaln` and `gated_adaln`
  (gated residual add fused with the next modulated LayerNorm, across block boundaries too).
"""
import torch
import torch.nn as nn

from duodiff_fast import ops

from .layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, Tokens, as_batch_timesteps,
                     check_time_convention, fast_path, iter_blocks, model_label_range, modulate, resolve_null_class,
                     unpatchify)

LN_EPS = 1e-6


def get_2d_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE style): (grid*grid, dim), float64. As the official DiT
    (and diffusers) build it: the first half of the channels encodes the column, the second half the row
    (their meshgrid puts w first); each half is [sin, cos]. Checkpoints carry their own table, so this only
    decides what a freshly built model starts from."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows = coords.repeat_interleave(grid)  # token index = row * grid + col
    cols = coords.repeat(grid)

    def emb1d(pos):  # (M,) -> (M, dim/2)
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb1d(cols), emb1d(rows)], dim=1)


#################################################################################
#                                  DiT blocks                                   #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """Torch path. x (B, L, C), c (B, C)."""
        mod = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward_fused(self, x, h, mod, next_shift, next_scale, next_eps=LN_EPS):
        """Inference path. h = adaln(x) with this block's (shift_msa, scale_msa), produced by whoever
        ran before; mod = this block's six (B, C) chunks. Returns (x_out, adaln(x_out, next_shift,
        next_scale)) so that the next consumer gets its normalised input from the same pass."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x, h = ops.gated_adaln(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, self.norm2.eps)
        return ops.gated_adaln(x, self.mlp(h), gate_mlp, next_shift, next_scale, next_eps)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm -> Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, p*p*C_out)


#################################################################################
#                                      DiT                                      #
#################################################################################

class DiT(nn.Module):
    """DiT denoiser: forward(x (B, C, H, W), t (B,), y (B,)) -> (B, out_channels, H, W).

    Extra keywords beyond the official ones: `time_convention` (how the sampler scales t; DiT was
    trained with integer t in [0, 999]: 'int') and `null_class` ('auto' = num_classes when the null
    embedding exists, i.e. class_dropout_prob > 0, else None).

    `cfg_channels = 3`: the official sampler (`forward_with_cfg`) guides only the first 3 of the 4
    latent eps channels; DuoSampler follows it by default.
    """

    cfg_channels = 3
    recommended_cfg_scale = None  # set by create_model from the preset

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, *,
                 time_convention="int", null_class="auto"):
        super().__init__()
        check_time_convention(time_convention)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.img_size = self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.null_class = resolve_null_class(
            null_class, num_classes, num_classes if class_dropout_prob > 0 else None)
        self.time_convention = time_convention
        self.depth_blocks = depth

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding, stored in the state_dict as upstream does (never trained).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """Official init: xavier Linear/patch conv, N(0, .02) label table and t-MLP, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        grid = int(self.num_patches ** 0.5)
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for lin in [blk.adaLN_modulation[-1] for blk in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                        self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x):
        """(B, L, p*p*C_out) -> (B, C_out, H, W)."""
        return unpatchify(x, self.out_channels)

    # ---- public pieces: embed, block iteration, head (early-exit heads and graphs compose these) ------
    @property
    def label_range(self) -> int:
        """Real class labels are [0, label_range) (the null class of guidance excluded)."""
        return model_label_range(self)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _mod(self, i, c):
        """adaLN chunks of block i (six (B, C) views of one Linear output), or the final layer's two."""
        if i < len(self.blocks):
            return self.blocks[i].adaLN_modulation(c).chunk(6, dim=1)
        return self.final_layer.adaLN_modulation(c).chunk(2, dim=1)

    def embed(self, x, t, y) -> Tokens:
        """(B, C, H, W), t, y -> the state before block 0: patch tokens + position embedding, and the
        conditioning c = t_emb + y_emb (B, C). Inference path: also block 0's adaLN chunks and its
        modulated norm1 of the tokens."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"DiT built for {self.input_size}x{self.input_size} inputs, "
                             f"got {tuple(x.shape)}")
        x = self.x_embedder(x) + self.pos_embed  # (B, L, C)
        t = as_batch_timesteps(t, x.shape[0], x.device)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, C)
        if not fast_path():
            return Tokens(x, None, 0, c, ())
        mod = self._mod(0, c)
        eps = self.blocks[0].norm1.eps if len(self.blocks) else LN_EPS
        h = ops.adaln(x, mod[0], mod[1], eps)  # (B, L, C)
        return Tokens(x, h, 0, c, tuple(mod))

    def block_step(self, tok: Tokens) -> Tokens:
        """Run block `tok.index`. Inference path: its last gated residual is fused with the next block's
        (or the final layer's) modulated LayerNorm; `aux` carries the next block's adaLN chunks, so each
        adaLN Linear runs once."""
        i, c = tok.index, tok.cond
        blk = self.blocks[i]
        if not fast_path():
            return Tokens(blk(tok.x, c), None, i + 1, c, ())
        mod = tok.aux if tok.aux else self._mod(i, c)
        h = tok.h
        if h is None:
            h = ops.adaln(tok.x, mod[0], mod[1], blk.norm1.eps)
        nxt = self._mod(i + 1, c)
        next_eps = self.blocks[i + 1].norm1.eps if i + 1 < len(self.blocks) else self.final_layer.norm_final.eps
        x, h = blk.forward_fused(tok.x, h, mod, nxt[0], nxt[1], next_eps)
        return Tokens(x, h, i + 1, c, tuple(nxt) if i + 1 < len(self.blocks) else ())

    def iter_blocks(self, tok: Tokens):
        """Yield the state before every block and after the last (see layers.iter_blocks)."""
        return iter_blocks(self, tok)

    def head(self, tok: Tokens) -> torch.Tensor:
        """Final state -> (B, out_channels, H, W): adaLN-modulated final norm, Linear, unpatchify."""
        if tok.h is not None:
            return self.unpatchify(self.final_layer.linear(tok.h))
        return self.unpatchify(self.final_layer(tok.x, tok.cond))  # (B, C_out, H, W)

    def forward(self, x, t, y):
        tok = self.embed(x, t, y)
        for _ in range(self.num_blocks):  # a plain loop: torch.compile traces it without graph breaks
            tok = self.block_step(tok)
        return self.head(tok)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance in one batch, as upstream: the first half of x is duplicated, y holds
        [labels, null labels]; guidance is applied to the first 3 channels only (upstream's choice for
        exact reproducibility of its results), the rest (learned sigma) comes from the model as is."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

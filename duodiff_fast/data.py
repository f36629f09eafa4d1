"""Datasets: a built-in offline image set, loaders for common on-disk formats, and image grids.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose items are
``(x, label)``: ``x`` a float32 ``[C, H, W]`` tensor (images in ``[-1, 1]``; latents as stored) and
``label`` a 0-dim int64 tensor. Each has ``num_classes``, ``img_size`` and ``channels``.
Unconditional data has ``num_classes == 0`` and every label is ``-1`` (U-ViT's convention: no class
token when ``num_classes <= 0``); ``-1`` is chosen over ``0`` so that feeding it to a class embedding
fails loudly instead of training a fake class.

All datasets also offer ``batch(indices) -> (x [B, C, H, W], labels [B])`` and ``__getitems__`` (the
batched fetch that ``DataLoader`` uses when present), which avoid a Python call per item.

Sources:
- ``Shapes``: procedurally drawn coloured shapes on textured backgrounds, 10 classes, any size,
  deterministic by seed, nothing downloaded; ``style='bold'`` and ``'plain'`` (specs ``shapes-bold``,
  ``shapes-plain``: the demo pair's data) draw larger, more central shapes in a hue set by the class on plain gradient backgrounds.
- ``cifar10``: the python pickle batches of ``cifar-10-python.tar.gz`` (folder or the tarball).
- ``image_folder``: one subfolder per class (or loose images: unconditional), read with Pillow.
- ``npz_images``: arrays in an ``.npz`` (uint8 NHWC or float NCHW in [-1, 1]).
- ``latent_features``: precomputed latents (``.npz`` / ``.pt`` / ``.safetensors`` with ``latents``,
  or a U-ViT style folder of ``{i}.npy`` files).
- ``get_dataset(spec)`` parses ``'shapes:32'``, ``'cifar10:/path'``, ``'folder:/path'`` and so on.
"""
from __future__ import annotations

import math
import os
import pickle
import tarfile

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "Shapes", "SHAPE_CLASSES", "TensorImages", "ImageFolder", "cifar10", "image_folder", "npz_images",
    "latent_features", "get_dataset", "save_grid", "to_uint8",
]


# -----------------------------------------------------------------------------
# Shared base
# -----------------------------------------------------------------------------

class _BatchedDataset(Dataset):
    """Items come from ``batch``; single items are batches of one."""

    num_classes: int = 0
    img_size: int = 0
    channels: int = 3

    def batch(self, indices):  # -> (x [B, C, H, W] float32, labels [B] int64)
        raise NotImplementedError

    def _check_indices(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for {type(self).__name__} of length {n}: "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return torch.where(idx < 0, idx + n, idx)

    def labels(self, indices=None) -> torch.Tensor:
        """Labels without loading images (subclasses that hold them set ``labels_``)."""
        return self.labels_ if indices is None else self.labels_[self._check_indices(indices)]

    def __getitem__(self, i):
        x, y = self.batch([int(i)])
        return x[0], y[0]

    def __getitems__(self, indices):
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))


# -----------------------------------------------------------------------------
# Shapes: built-in procedural dataset
# -----------------------------------------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "star", "crescent",
                 "horizontal_bars", "vertical_bars", "ellipse")
# Classes whose identity depends on orientation (square vs diamond, horizontal vs vertical bars)
# only get a small tilt; the rest are drawn at any angle.
_TILT_ONLY = {1, 7, 8}
_MAX_TILT = math.radians(18.0)

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 tensors holding values in [0, 2^32).

    Both multipliers are below 2^31, so every product stays below 2^63: no int64 overflow, the
    result is exact and identical on every platform (constants from C. Wellons' hash-prospector).
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _uniform(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): ``[B, count]`` float32, a pure function of (key, stream, j)."""
    j = torch.arange(count, dtype=torch.int64) + (stream << 20)
    h = _hash32(keys[:, None] ^ _hash32(j & _M32)[None, :])
    h = _hash32(h)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _hsv_to_rgb(h, s, v):  # each [B] in [0, 1] -> [B, 3]
    k = torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], -1)
    k = (k + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def _box(qx, qy, bx, by):
    """Signed distance to an axis-aligned box of half-extents (bx, by)."""
    dx, dy = qx.abs() - bx, qy.abs() - by
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle(qx, qy, r=0.95):
    """Equilateral triangle centred on its centroid (after Inigo Quilez's 2D distance functions)."""
    k = math.sqrt(3.0)
    px, py = qx.abs() - r, qy + r / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0.0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _star5(qx, qy, r=0.95, rf=0.45):
    """Five-pointed star by folding into one wedge, then distance to one edge segment."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x = -k1x
    px, py = qx.abs(), -qy  # point up in image coordinates (y grows downwards)
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k1y
    px, py = px.abs(), py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, r)
    ex, ey = px - bax * h, py - bay * h
    return torch.sqrt(ex * ex + ey * ey) * torch.sign(py * bax - px * bay)


def _bars(along, across, n=3, half_len=0.85, half_w=0.15, gap=0.55):
    # Fold `across` onto the nearest bar centre so one box serves all n bars.
    c = gap * torch.round((across / gap).clamp(-(n - 1) / 2, (n - 1) / 2))
    return _box(along, across - c, half_len, half_w)


def _shape_sdf(cls: int, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) in the shape's unit frame; shapes span about [-1, 1]."""
    r = torch.sqrt(qx * qx + qy * qy)
    if cls == 0:
        return r - 0.9
    if cls == 1:
        return _box(qx, qy, 0.75, 0.75)
    if cls == 2:
        return _triangle(qx, qy)
    if cls == 3:
        return (r - 0.68).abs() - 0.24
    if cls == 4:
        return torch.minimum(_box(qx, qy, 0.92, 0.27), _box(qx, qy, 0.27, 0.92))
    if cls == 5:
        return _star5(qx, qy)
    if cls == 6:
        inner = torch.sqrt((qx - 0.42) ** 2 + qy * qy) - 0.72
        return torch.maximum(r - 0.92, -inner)
    if cls == 7:
        return _bars(qx, qy)
    if cls == 8:
        return _bars(qy, qx)
    if cls == 9:
        # Scaled-circle distance: not exact for an ellipse, but its error is far below a pixel
        # at the edge, which is all the soft edge needs.
        a, b = 0.95, 0.48
        return (torch.sqrt((qx / a) ** 2 + (qy / b) ** 2) - 1.0) * b
    raise ValueError(f"unknown shape class {cls}")


def _smoothstep01(t):
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# Per-item random parameters, one column each (see Shapes.render).
_PARAMS = ("cx", "cy", "size", "rot", "fg_h", "fg_s", "fg_v", "bg_dh", "bg_s", "bg_v", "polarity",
           "grad_dir", "grad_amt", "grad_dh", "shade_dir", "shadow_dx", "shadow_dy", "shadow_amt",
           "grain", "tex_amt", "edge", "tile_a", "tile_b", "shift_a", "shift_b")
_TEX_K = 6  # cosine basis functions per axis for the background texture (up to 2.5 cycles per image)
SHAPE_STYLES = ("textured", "bold", "plain")
# dataset-spec name -> Shapes style
SHAPES_SPECS = {"shapes": "textured", "shapes-bold": "bold", "shapes-plain": "plain"}


class Shapes(_BatchedDataset):
    """Built-in offline image dataset: a coloured shape on a textured background, labelled by shape.

    Item ``i`` is a pure function of ``(seed, i)`` (counter-based hashing, no global RNG state), so any
    subset in any order gives the same pixels. Classes are the first ``num_classes`` of
    ``SHAPE_CLASSES`` (circle, square, triangle, ring, cross, star, crescent, horizontal bars, vertical
    bars, ellipse); ``label(i) = i % num_classes`` keeps the classes balanced. Shapes vary in position,
    size, rotation (a small tilt only where orientation is the class), hue and contrast polarity,
    with soft anti-aliased edges, a drop shadow and light shading, on a background of a colour
    gradient with low-frequency texture and fine grain. Any ``img_size`` works; geometry is
    resolution independent. Rendering is vectorised over the batch: use ``batch(indices)`` (or a
    ``DataLoader``, which calls ``__getitems__``) for speed.

    ``style='bold'`` makes the class the dominant signal of an image, which is what a small denoiser
    trained for minutes on a CPU (the demo pair) needs in order to learn its classes: no background
    texture, grain, drop shadow or shading (a plain two-colour gradient), shapes larger (half-size
    0.42-0.62 of the half-width instead of 0.36-0.62) and nearer the centre (half the offset), and the
    shape's hue set by its class (class k: hue k/10, +-0.03), its saturation and value still random.
    Measured why: a 13-block U-ViT trained 1,000 steps on textured, then on same-place plain-background
    shapes, still ignored its label (eps moved 0.4% by it), since the class decides few of the pixels.
    The label still carries the shape: the proxy classifier, trained on textured shapes in every hue,
    recognises bold ones by shape: 98.9% of 1,000 (textured: 98.4%).

    ``style='plain'`` (spec ``shapes-plain``, the demo pair's data) is ``bold`` with the geometry pinned
    down as well: the shape near the centre (offset at most 0.08 of the half-width), half-size
    0.52-0.62, and every class upright up to a small tilt (+-18 degrees). Measured why: a 13-block
    U-ViT trained 6,500 CPU steps on bold shapes drew the right colours but ragged blobs (41.5% class
    accuracy), since free position and rotation leave it a family of shapes to learn per class; with
    the place and pose fixed it learns ten templates (README, 'The demo').
    """

    classes = SHAPE_CLASSES
    _CHUNK = 256  # items per render call

    def __init__(self, n: int = 50_000, img_size: int = 32, seed: int = 0, num_classes: int = 10,
                 style: str = "textured"):
        if style not in SHAPE_STYLES:
            raise ValueError(f"Shapes: style must be one of {SHAPE_STYLES}, got {style!r}")
        if n < 0:
            raise ValueError(f"Shapes: n must be >= 0, got {n}")
        if img_size < 4:
            raise ValueError(f"Shapes: img_size must be >= 4, got {img_size}")
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"Shapes: num_classes must be in 1..{len(SHAPE_CLASSES)}, got {num_classes}")
        self.n, self.img_size, self.seed = int(n), int(img_size), int(seed)
        self.num_classes = int(num_classes)
        self.style = style
        self.channels = 3
        self.classes = SHAPE_CLASSES[:num_classes]
        self._key = int(_hash32(_hash32(torch.tensor(self.seed & _M32)) ^ ((self.seed >> 32) & _M32)))
        s = self.img_size
        # Pixel-centre coordinates in [-1, 1], x to the right, y downwards.
        self._lin = (torch.arange(s, dtype=torch.float32) + 0.5) * (2.0 / s) - 1.0
        # Cosine basis for the background texture: tex = C @ A @ C^T with random A per item.
        k = torch.arange(_TEX_K, dtype=torch.float32)
        self._basis = torch.cos(math.pi * (self._lin[:, None] + 1) / 2 * k[None, :])  # (S, K)
        f = k[:, None] + k[None, :]
        amp = 1.0 / (1.0 + f) ** 1.5
        amp[0, 0] = 0.0  # the mean level is the gradient's job
        self._tex_amp = amp / amp.square().sum().sqrt()  # (K, K), unit total power
        self._bank = None

    def __len__(self):
        return self.n

    def __repr__(self):
        style = "" if self.style == "textured" else f", style={self.style!r}"
        return (f"Shapes(n={self.n}, img_size={self.img_size}, seed={self.seed}, "
                f"num_classes={self.num_classes}{style})")

    def labels(self, indices=None) -> torch.Tensor:
        """Labels of `indices` (all items when None) without rendering anything."""
        idx = torch.arange(self.n) if indices is None else self._check_indices(indices)
        return idx % self.num_classes

    def batch(self, indices):
        idx = self._check_indices(indices)
        # Chunks keep a render's ~20 full-size temporaries in cache: a single 2000-image render
        # measured about twice the CPU time of eight 256-image ones.
        x = torch.cat([self.render(c) for c in idx.split(self._CHUNK)]) if idx.numel() > self._CHUNK \
            else self.render(idx)
        return x, idx % self.num_classes

    def _grain_bank(self) -> torch.Tensor:
        """Tiles of uniform noise [T, 3, 2*S*S] (each tile twice over) drawn once from the seed.

        Hashing every pixel of every item costs more than the rest of the rendering; instead each
        item sums two tiles under random circular shifts, which is as good as fresh noise to the eye
        and to a network, and still a pure function of (seed, i).
        """
        if self._bank is None:
            s = self.img_size
            tiles = max(16, min(256, (1 << 22) // (3 * s * s)))  # at most ~16 MB
            g = torch.Generator().manual_seed(self._key)
            bank = torch.rand(tiles, 3, s * s, generator=g) - 0.5
            self._bank = torch.cat([bank, bank], dim=2)
        return self._bank

    @torch.no_grad()
    def render(self, idx: torch.Tensor) -> torch.Tensor:
        """Draw items ``idx`` ([B] int64) -> [B, 3, H, W] float32 in [-1, 1]."""
        B, S = idx.numel(), self.img_size
        if B == 0:
            return torch.empty(0, 3, S, S)
        # Render in class order so each class's distance function runs on one contiguous slice.
        cls = idx % self.num_classes
        order = torch.argsort(cls, stable=True)
        idx, cls = idx[order], cls[order]
        counts = torch.bincount(cls, minlength=self.num_classes).tolist()

        keys = _hash32((idx & _M32) ^ self._key)
        u = _uniform(keys, 0, len(_PARAMS))  # (B, P)
        P = {name: u[:, j] for j, name in enumerate(_PARAMS)}
        col = lambda v: v[:, None, None]  # noqa: E731 - (B,) -> (B, 1, 1) for (B, H, W) maps
        lin = self._lin
        px = 2.0 / S  # one pixel in image units

        # ---- geometry: unit-frame coordinates of every pixel, for the shape and for its shadow
        plain = self.style == "plain"
        bold = self.style == "bold" or plain  # plain = bold colours and background, fixed place and pose
        if plain:
            size = 0.52 + 0.1 * P["size"]  # half-size; image spans [-1, 1]
            margin = torch.full_like(size, 0.08)
        else:
            size = (0.42 + 0.2 * P["size"]) if bold else (0.36 + 0.26 * P["size"])
            margin = (1.0 - 0.95 * size) * (0.5 if bold else 1.0)
        cx, cy = (2 * P["cx"] - 1) * margin, (2 * P["cy"] - 1) * margin
        tilt_only = torch.full((B,), plain, dtype=torch.bool)
        for c in _TILT_ONLY:
            tilt_only |= cls == c
        rot = torch.where(tilt_only, (2 * P["rot"] - 1) * _MAX_TILT, P["rot"] * 2 * math.pi)
        cos, sin = torch.cos(rot) / size, torch.sin(rot) / size
        shadow_dx = (0.05 + 0.06 * P["shadow_dx"]) * size
        shadow_dy = (0.06 + 0.06 * P["shadow_dy"]) * size
        # Shape frame and shadow frame stacked on a leading axis of 2: one distance call serves both.
        dx = lin[None, None, :] - torch.stack([cx, cx + shadow_dx])[:, :, None]  # (2, B, W)
        dy = lin[None, None, :] - torch.stack([cy, cy + shadow_dy])[:, :, None]  # (2, B, H)
        qx = cos[None, :, None, None] * dx[:, :, None, :] + sin[None, :, None, None] * dy[:, :, :, None]
        qy = cos[None, :, None, None] * dy[:, :, :, None] - sin[None, :, None, None] * dx[:, :, None, :]
        dist = torch.empty(2, B, S, S)  # (2, B, H, W)
        start = 0
        for c, cnt in enumerate(counts):  # a loop over classes, not items
            if cnt:
                sl = slice(start, start + cnt)
                dist[:, sl] = _shape_sdf(c, qx[:, sl], qy[:, sl])
                start += cnt
        # Distances back to image units (the frame was scaled by 1/size), then a ~1 pixel soft edge.
        dist = dist * col(size)
        alpha = _smoothstep01(0.5 - dist[0] / col(px * (0.8 + 0.6 * P["edge"])))  # (B, H, W)
        shadow = _smoothstep01(0.5 - dist[1] / col(4 * px + 0.08 * size))

        # ---- colours: foreground and background differ in hue and in value (either polarity)
        bright_fg = P["polarity"] < 0.5
        fg_v = torch.where(bright_fg, 0.72 + 0.26 * P["fg_v"], 0.22 + 0.25 * P["fg_v"])
        bg_v = torch.where(bright_fg, 0.18 + 0.25 * P["bg_v"], 0.62 + 0.3 * P["bg_v"])
        fg_h = (cls.float() / self.num_classes + 0.06 * (P["fg_h"] - 0.5)) % 1.0 if bold else P["fg_h"]
        fg = _hsv_to_rgb(fg_h, 0.5 + 0.45 * P["fg_s"], fg_v)  # (B, 3)
        bg_h = (fg_h + 0.25 + 0.5 * P["bg_dh"]) % 1.0
        bg_s = 0.1 + 0.4 * P["bg_s"]
        bg_a = _hsv_to_rgb(bg_h, bg_s, bg_v)
        bg_b = _hsv_to_rgb((bg_h + 0.16 * (P["grad_dh"] - 0.5)) % 1.0, bg_s,
                           (bg_v * (0.65 + 0.6 * P["grad_amt"])).clamp(max=1.0))

        # ---- background: linear colour gradient x (1 + smooth random texture)
        gd = P["grad_dir"] * 2 * math.pi
        t = (0.5 + 0.5 * (col(torch.cos(gd)) * lin[None, None, :] + col(torch.sin(gd)) * lin[None, :, None]))
        t = t.clamp(0, 1)[:, None]  # (B, 1, H, W)
        bg = torch.addcmul(bg_a[:, :, None, None], (bg_b - bg_a)[:, :, None, None], t)  # (B, 3, H, W)
        if bold:  # no texture, shadow, shading or grain
            img = torch.lerp(bg, fg[:, :, None, None].expand_as(bg), alpha[:, None])
            img = img.clamp_(0, 1).mul_(2).sub_(1)
            out = torch.empty_like(img)
            out[order] = img
            return out
        K = _TEX_K
        coef = (_uniform(keys, 1, 2 * K * K).view(B, 2, K, K) - 0.5) * self._tex_amp
        tint = torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1)
        coef = coef[:, :1] + 0.35 * coef[:, 1:] * tint  # (B, 3, K, K): shared luma + a little colour
        tex = self._basis @ coef @ self._basis.T  # (B, 3, H, W)
        bg = bg * (1 + tex * (0.45 + 0.75 * P["tex_amt"])[:, None, None, None])
        bg = bg * (1 - (0.25 + 0.3 * P["shadow_amt"])[:, None, None, None] * shadow[:, None])

        # ---- shape: flat colour with a soft directional shading across its body
        sh = P["shade_dir"] * 2 * math.pi
        shade = 1 + 0.12 * size[:, None, None] * (col(torch.cos(sh)) * qx[0] + col(torch.sin(sh)) * qy[0])
        img = torch.lerp(bg, fg[:, :, None, None] * shade[:, None], alpha[:, None])

        # ---- fine grain, like sensor noise: two bank tiles under random circular shifts
        bank = self._grain_bank()  # (T, 3, 2*S*S): each tile stored twice so shifts need no modulo
        T, SS = bank.shape[0], S * S
        windows = bank.unfold(2, SS, 1)  # (T, 3, SS + 1, SS) view: one window per circular shift
        grain = None
        for tk, sk in (("tile_a", "shift_a"), ("tile_b", "shift_b")):
            tile = (P[tk] * T).long().clamp(max=T - 1)
            g = windows[tile, :, (P[sk] * SS).long()]  # (B, 3, S*S)
            grain = g if grain is None else grain.add_(g)
        grain = grain.view(B, 3, S, S).mul_((math.sqrt(6) * (0.01 + 0.025 * P["grain"]))[:, None, None, None])
        img = img.add_(grain).clamp_(0, 1).mul_(2).sub_(1)
        out = torch.empty_like(img)
        out[order] = img
        return out


# -----------------------------------------------------------------------------
# In-memory tensors (CIFAR-10, .npz, latents, small folders)
# -----------------------------------------------------------------------------

class TensorImages(_BatchedDataset):
    """Dataset over an in-memory ``[N, C, H, W]`` tensor.

    uint8 data holds pixels 0..255 and is mapped to [-1, 1] on access (4x less memory than float);
    float data is returned as stored. ``labels`` is ``[N]`` int64 or None (unconditional: label -1).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None,
                 source: str = "tensor"):
        if data.ndim != 4:
            raise ValueError(f"{source}: expected data of shape [N, C, H, W], found {tuple(data.shape)}")
        self.data, self.source = data, source
        n = data.shape[0]
        if labels is None:
            self.labels_ = torch.full((n,), -1, dtype=torch.int64)
            self.num_classes = 0
        else:
            labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
            if labels.numel() != n:
                raise ValueError(f"{source}: expected one label per item ({n}), "
                                 f"found {labels.numel()} labels")
            if n and int(labels.min()) < 0:
                raise ValueError(f"{source}: expected labels >= 0, found {int(labels.min())}")
            self.labels_ = labels
            self.num_classes = int(num_classes if num_classes is not None
                                   else (int(labels.max()) + 1 if n else 0))
        self.channels, self.img_size = int(data.shape[1]), int(data.shape[2])

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        return (f"{type(self).__name__}(source={self.source!r}, n={len(self)}, channels={self.channels}, "
                f"img_size={self.img_size}, num_classes={self.num_classes}, dtype={self.data.dtype})")

    def batch(self, indices):
        idx = self._check_indices(indices)
        x = self.data[idx]
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) * (2.0 / 255.0) - 1.0
        else:
            x = x.to(torch.float32)
        return x, self.labels_[idx]


# -----------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# -----------------------------------------------------------------------------

_CIFAR_LAYOUT = ("expected the python version of CIFAR-10: a folder with data_batch_1..data_batch_5 and "
                 "test_batch (as extracted from cifar-10-python.tar.gz, usually 'cifar-10-batches-py'), "
                 "or the cifar-10-python.tar.gz file itself")


def _cifar_batch(raw: bytes, where: str):
    try:
        # The official batches are pickles of dicts with bytes keys; only load files you trust.
        d = pickle.loads(raw, encoding="bytes")
    except Exception as e:
        raise ValueError(f"{where}: not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e}); "
                         f"{_CIFAR_LAYOUT}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict with keys b'data' and b'labels', "
                         f"found {type(d).__name__}")
    get = lambda k: d.get(k, d.get(k.decode()))  # noqa: E731 - accept str keys too (re-pickled copies)
    data, labels = get(b"data"), get(b"labels")
    if data is None or labels is None:
        keys = sorted(str(k) for k in d)
        raise ValueError(f"{where}: expected keys b'data' and b'labels', found {keys}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: expected b'data' as uint8 [N, 3072], "
                         f"found {data.dtype} {list(data.shape)}")
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{where}: expected {data.shape[0]} labels (one per image), found {labels.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: expected labels in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def cifar10(root: str, train: bool = True) -> TensorImages:
    """CIFAR-10 from its python pickle batches: 32x32 RGB, 10 classes, 50k train / 10k test.

    ``root`` is the extracted folder (``cifar-10-batches-py``), a folder containing it, or the
    ``cifar-10-python.tar.gz`` archive itself. Nothing is downloaded.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    root = os.fspath(root)
    blobs = []
    if os.path.isfile(root) and tarfile.is_tarfile(root):
        with tarfile.open(root) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"{root}: archive lacks {missing}; {_CIFAR_LAYOUT}")
            blobs = [(f"{root}:{members[n].name}", tar.extractfile(members[n]).read()) for n in names]
    elif os.path.isdir(root):
        folder = root
        if not os.path.exists(os.path.join(root, names[0])):
            sub = os.path.join(root, "cifar-10-batches-py")
            if os.path.isdir(sub):
                folder = sub
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"{folder}: missing {missing}; {_CIFAR_LAYOUT}")
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                blobs.append((os.path.join(folder, n), f.read()))
    elif os.path.exists(root):
        raise ValueError(f"{root}: not a folder or a tar archive; {_CIFAR_LAYOUT}")
    else:
        raise FileNotFoundError(f"{root}: no such file or folder; {_CIFAR_LAYOUT}")
    parts = [_cifar_batch(raw, where) for where, raw in blobs]
    data = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return TensorImages(data, labels, num_classes=10, source=root)


# -----------------------------------------------------------------------------
# Image folders (Pillow)
# -----------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_FOLDER_LAYOUT = ("expected an image folder: one subfolder per class holding images "
                  f"({', '.join(IMAGE_EXTENSIONS)}), or images directly in the folder (unconditional)")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading and writing images needs Pillow: pip install pillow") from e
    return Image


def _load_image(path: str, img_size: int, channels: int) -> np.ndarray:
    """Read, centre-crop to a square, resize -> uint8 [H, W, C]."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != img_size:
                gap = None if s < 2 * img_size else 2.0  # box-reduce first when shrinking a lot
                im = im.resize((img_size, img_size), Image.BICUBIC, reducing_gap=gap)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return a[:, :, None] if a.ndim == 2 else a


class ImageFolder(_BatchedDataset):
    """Images read lazily from a folder tree; labels from sorted subfolder names."""

    def __init__(self, root: str, img_size: int, channels: int = 3):
        root = os.fspath(root)
        if not os.path.isdir(root):
            kind = "not a folder" if os.path.exists(root) else "no such folder"
            raise FileNotFoundError(f"{root}: {kind}; {_FOLDER_LAYOUT}")
        if channels not in (1, 3):
            raise ValueError(f"image_folder: channels must be 1 or 3, got {channels}")
        is_img = lambda f: f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")  # noqa: E731
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                         and not d.startswith("."))
        files, labels, classes = [], [], []
        for d in subdirs:
            found = []
            for dirpath, _, names in sorted(os.walk(os.path.join(root, d))):
                found += [os.path.join(dirpath, f) for f in sorted(names) if is_img(f)]
            if found:
                labels += [len(classes)] * len(found)
                classes.append(d)
                files += found
        if not files:  # no class folders: loose images, unconditional
            files = [os.path.join(root, f) for f in sorted(os.listdir(root))
                     if is_img(f) and os.path.isfile(os.path.join(root, f))]
            labels = [-1] * len(files)
        if not files:
            raise ValueError(f"{root}: no images found; {_FOLDER_LAYOUT}")
        self.root, self.files, self.classes = root, files, classes
        self.labels_ = torch.tensor(labels, dtype=torch.int64)
        self.num_classes, self.img_size, self.channels = len(classes), int(img_size), channels

    def __len__(self):
        return len(self.files)

    def __repr__(self):
        return (f"ImageFolder(root={self.root!r}, n={len(self)}, img_size={self.img_size}, "
                f"num_classes={self.num_classes})")

    def batch(self, indices):
        idx = self._check_indices(indices)
        arr = np.stack([_load_image(self.files[i], self.img_size, self.channels) for i in idx.tolist()]) \
            if idx.numel() else np.zeros((0, self.img_size, self.img_size, self.channels), np.uint8)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32) * (2.0 / 255.0) - 1.0
        return x.contiguous(), self.labels_[idx]


def image_folder(root: str, img_size: int, channels: int = 3) -> ImageFolder:
    """Images from ``root/<class>/*.png|jpg|...`` (or loose in ``root``: unconditional).

    Images are centre-cropped to a square and resized to ``img_size`` with Pillow, lazily per item.
    """
    _pil()
    return ImageFolder(root, img_size, channels)


# -----------------------------------------------------------------------------
# .npz images and latent features
# -----------------------------------------------------------------------------

def _load_npz(path: str, what: str) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        kind = "not a file" if os.path.exists(path) else "no such file"
        raise FileNotFoundError(f"{path}: {kind}; {what}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); {what}") from e


def _to_nchw(a: np.ndarray, path: str) -> np.ndarray:
    """Bring a 3-D/4-D image array to NCHW; ambiguity resolved by dtype (uint8 NHWC, float NCHW)."""
    if a.ndim == 3:  # [N, H, W] grayscale
        return a[:, None]
    if a.ndim != 4:
        raise ValueError(f"{path}: expected images of shape [N, H, W, C] or [N, C, H, W], "
                         f"found {list(a.shape)}")
    last_c, first_c = a.shape[3] in (1, 3), a.shape[1] in (1, 3)
    if last_c and (not first_c or a.dtype == np.uint8):
        return a.transpose(0, 3, 1, 2)
    if first_c:
        return a
    raise ValueError(f"{path}: expected 1 or 3 channels (NHWC or NCHW), found shape {list(a.shape)}")


_NPZ_LAYOUT = ("expected an .npz with images under 'images' or 'arr_0' (uint8 [N, H, W, C] in 0..255 or "
               "float [N, C, H, W] in [-1, 1]) and optionally int labels [N] under 'labels'")


def npz_images(path: str, key: str | None = None, labels_key: str = "labels") -> TensorImages:
    """Images from an ``.npz``: uint8 NHWC (0..255) or float NCHW (already in [-1, 1]).

    ``key`` defaults to ``'images'``, then ``'arr_0'`` (what ``np.savez(path, x)`` writes and what the
    CLI's sample dump uses). Labels come from ``labels_key`` when present, else the set is
    unconditional. Square images only (the models are square).
    """
    z = _load_npz(path, _NPZ_LAYOUT)
    keys = [key] if key is not None else ["images", "arr_0"]
    found = next((k for k in keys if k in z), None)
    if found is None:
        raise ValueError(f"{path}: no array under {keys}, found keys {sorted(z)}; {_NPZ_LAYOUT}")
    a = z[found]
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
        if a.size and (not np.isfinite(a).all() or a.min() < -1.001 or a.max() > 1.001):
            raise ValueError(f"{path}: float images must be finite and in [-1, 1], found range "
                             f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; store uint8 0..255 otherwise")
        a = np.clip(a, -1.0, 1.0)
    else:
        raise ValueError(f"{path}: '{found}' has dtype {a.dtype}; {_NPZ_LAYOUT}")
    a = np.ascontiguousarray(_to_nchw(a, path))
    if a.shape[2] != a.shape[3]:
        raise ValueError(f"{path}: expected square images, found H x W = {a.shape[2]} x {a.shape[3]}")
    labels = z.get(labels_key)
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected integer labels under '{labels_key}', found {labels.dtype}")
    labels = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return TensorImages(torch.from_numpy(a), labels, source=path)


_LATENT_LAYOUT = ("expected precomputed latents: an .npz, .pt or .safetensors holding 'latents' "
                  "[N, C, h, w] (optional 'labels' [N], optional scalar 'scale_factor'), or a U-ViT "
                  "feature folder of 0.npy..{N-1}.npy each holding (latent, label)")


class LatentFeatures(TensorImages):
    """Precomputed latents, returned as stored; ``scale_factor`` (or None) is kept for the trainer."""

    scale_factor: float | None = None


class LatentFolder(_BatchedDataset):
    """U-ViT feature folder: ``{i}.npy`` holding a pickled ``(latent [C, h, w], label)`` pair, read lazily."""

    scale_factor = None

    def __init__(self, root: str, num_classes: int | None = None):
        n = sum(1 for f in os.listdir(root) if f.endswith(".npy") and f[:-4].isdigit())
        if n == 0:
            raise ValueError(f"{root}: no {{i}}.npy files; {_LATENT_LAYOUT}")
        self.root, self.n = root, n
        for i in range(n):
            if not os.path.isfile(os.path.join(root, f"{i}.npy")):
                raise ValueError(f"{root}: {n} .npy files but {i}.npy is missing; "
                                 f"expected 0.npy..{n - 1}.npy")
        z0, _ = self._read(0)
        self.channels, self.img_size = int(z0.shape[0]), int(z0.shape[1])
        if num_classes is None:
            # Reading every label of ImageNet's 2.5M files would take minutes: ask instead.
            if n > 20_000:
                raise ValueError(f"{root}: {n} feature files; pass num_classes= (e.g. 1000 for ImageNet) "
                                 "rather than scanning every label")
            top = max(self._read(i)[1] for i in range(n))
            num_classes = top + 1 if top >= 0 else 0
        self.num_classes = int(num_classes)

    def _read(self, i):
        path = os.path.join(self.root, f"{i}.npy")
        try:
            # U-ViT saves (moments, label) tuples, which needs pickle: only read folders you trust.
            item = np.load(path, allow_pickle=True)
            z, y = item[0], int(item[1])
        except Exception as e:
            raise ValueError(f"{path}: expected a (latent [C, h, w], label) pair ({type(e).__name__}: {e}); "
                             f"{_LATENT_LAYOUT}") from e
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 3:
            raise ValueError(f"{path}: expected a latent of shape [C, h, w], found {list(z.shape)}")
        return z, y

    def __len__(self):
        return self.n

    def batch(self, indices):
        idx = self._check_indices(indices)
        items = [self._read(i) for i in idx.tolist()]
        if not items:
            s = self.img_size
            return torch.empty(0, self.channels, s, s), torch.empty(0, dtype=torch.int64)
        x = torch.from_numpy(np.stack([z for z, _ in items]))
        return x, torch.tensor([y for _, y in items], dtype=torch.int64)


def latent_features(path: str, num_classes: int | None = None):
    """Precomputed latents for latent diffusion models, returned as stored (no scaling applied).

    ``path``: ``.npz`` / ``.pt`` / ``.pth`` / ``.safetensors`` with ``latents`` [N, C, h, w], optional
    ``labels`` [N] and optional scalar ``scale_factor`` (exposed as ``ds.scale_factor``, else None);
    or a U-ViT feature folder (``{i}.npy`` with a pickled ``(moments, label)``; moments hold mean and
    log-variance, so ``channels`` is 8 there). ``num_classes`` overrides ``max(label) + 1``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return LatentFolder(path, num_classes)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder; {_LATENT_LAYOUT}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        d = _load_npz(path, _LATENT_LAYOUT)
    elif ext in (".pt", ".pth"):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {e}); "
                             f"{_LATENT_LAYOUT}") from e
        if isinstance(d, torch.Tensor):
            d = {"latents": d}
    elif ext == ".safetensors":
        from safetensors.torch import load_file
        try:
            d = load_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); {_LATENT_LAYOUT}") from e
    else:
        raise ValueError(f"{path}: unknown extension {ext!r}; {_LATENT_LAYOUT}")
    if not isinstance(d, dict) or "latents" not in d:
        found = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: no 'latents' entry, found {found}; {_LATENT_LAYOUT}")
    z = d["latents"]
    z = z if isinstance(z, torch.Tensor) else torch.from_numpy(np.asarray(z))
    if z.ndim != 4 or not z.is_floating_point():
        raise ValueError(f"{path}: expected float 'latents' [N, C, h, w], found {z.dtype} {list(z.shape)}")
    labels = d.get("labels")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.is_floating_point():
            raise ValueError(f"{path}: expected integer 'labels', found {labels.dtype}")
    ds = LatentFeatures(z.to(torch.float32).contiguous(), labels, num_classes, source=path)
    sf = d.get("scale_factor")
    ds.scale_factor = None if sf is None else float(np.asarray(sf).reshape(()))
    return ds


# -----------------------------------------------------------------------------
# Spec parsing
# -----------------------------------------------------------------------------

_SPECS = ("'shapes' or 'shapes:<img_size>', 'shapes-bold[:<img_size>]', 'shapes-plain[:<img_size>]', 'cifar10:<folder or tar.gz>', 'folder:<folder>', "
          "'npz:<file.npz>', 'latents:<file or folder>'")


_PATH_LOADERS = ("cifar10", "cifar-10", "cifar", "folder", "imagefolder", "image_folder", "npz", "latents",
                 "latent", "features")


def get_dataset(spec: str, **kwargs):
    """Build a dataset from a spec string; ``kwargs`` go to the loader.

    ``'shapes'`` / ``'shapes:64'`` (kwargs ``n=50000, seed=0, num_classes=10, style='textured'``);
    ``'shapes-bold'`` / ``'shapes-bold:32'``, ``'shapes-plain'``: the same with ``style='bold'`` / ``'plain'``;
    ``'cifar10:/data/cifar-10-batches-py'`` (``train=True``); ``'folder:/data/imgs'`` (``img_size``,
    default 32); ``'npz:/data/x.npz'`` (``key``, ``labels_key``); ``'latents:/data/feats.npz'``.
    A bare existing path is recognised by its content.
    """
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name in SHAPES_SPECS:
        if arg:
            try:
                kwargs.setdefault("img_size", int(arg))
            except ValueError:
                raise ValueError(f"dataset spec {spec!r}: expected '{name}:<img_size>' "
                                 "with an integer size") from None
        kwargs.setdefault("style", SHAPES_SPECS[name])
        return Shapes(**kwargs)
    if name in _PATH_LOADERS and not arg.strip():
        raise ValueError(f"dataset spec {spec!r}: expected '{name}:<path>'; specs: {_SPECS}")
    if name in ("cifar10", "cifar-10", "cifar"):
        return cifar10(arg, **kwargs)
    if name in ("folder", "imagefolder", "image_folder"):
        kwargs.setdefault("img_size", 32)
        return image_folder(arg, **kwargs)
    if name == "npz":
        return npz_images(arg, **kwargs)
    if name in ("latents", "latent", "features"):
        return latent_features(arg, **kwargs)
    if os.path.exists(spec):
        return _guess(spec, **kwargs)
    raise ValueError(f"dataset spec {spec!r}: unknown dataset {name!r} and no such path; expected {_SPECS}")


def _guess(path: str, **kwargs):
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(p, "data_batch_1"))
               for p in (path, os.path.join(path, "cifar-10-batches-py"))):
            return cifar10(path, **kwargs)
        if os.path.exists(os.path.join(path, "0.npy")):
            return latent_features(path, **kwargs)
        kwargs.setdefault("img_size", 32)
        return image_folder(path, **kwargs)
    if path.endswith((".tar.gz", ".tgz")):
        return cifar10(path, **kwargs)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            is_latent = "latents" in z.files
        return latent_features(path, **kwargs) if is_latent else npz_images(path, **kwargs)
    if path.endswith((".pt", ".pth", ".safetensors")):
        return latent_features(path, **kwargs)
    raise ValueError(f"{path}: cannot tell what dataset this is; expected {_SPECS}")


# -----------------------------------------------------------------------------
# Images out
# -----------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
    """[N, C, H, W] (or [C, H, W]) in [-1, 1] -> numpy uint8 [N, H, W, C] (values clipped)."""
    x = torch.as_tensor(images).detach()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"to_uint8: expected images [N, C, H, W], found shape {list(x.shape)}")
    x = ((x.to(torch.float32).cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(images, path: str, nrow: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> np.ndarray:
    """Write images [N, C, H, W] in [-1, 1] (C = 1 or 3) as one PNG grid; returns the uint8 grid.

    ``nrow`` is the number of images per row (default: ceil(sqrt(N))); ``pad_value`` in [-1, 1].
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"save_grid: expected images [N>0, 1 or 3, H, W], found shape {list(x.shape)}")
    n, c, h, w = x.shape
    nrow = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / nrow)
    fill = int(round((pad_value + 1) * 127.5))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), fill, np.uint8)
    u8 = to_uint8(x)
    for k in range(n):
        r, col = divmod(k, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = u8[k]
    Image = _pil()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)
    return grid

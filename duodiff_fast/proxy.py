"""Proxy classifier: a small CNN trained on the built-in Shapes dataset, for offline FID.

Real FID needs Inception weights that cannot be assumed present. Offline, `duodiff_fast.eval`
measures the Frechet distance in the 128-d pooled features of this classifier instead. Its weights
are shipped in ``duodiff_fast/assets/proxy_classifier.safetensors`` (produced by
``tools/train_proxy_classifier.py``; the file's metadata records the dataset spec, image size, test
accuracy and feature dimension). The features are meaningful for Shapes-like images only: a proxy
FID on CIFAR-10 or ImageNet samples compares them in a space that was never trained on such images.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProxyClassifier", "DEFAULT_WEIGHTS", "as_float_images"]

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                               "proxy_classifier.safetensors")


def as_float_images(images) -> torch.Tensor:
    """Images in any of the project's layouts -> float32 ``[N, C, H, W]`` in [-1, 1].

    uint8 input (tensor or array) holds pixels 0..255, in NHWC (the ``samples.npz`` layout) when its
    last dim is 1 or 3, else in NCHW; float input is taken as NCHW in [-1, 1] as is.
    """
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
    else:
        x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W] (float) or [N, H, W, C] (uint8), "
                         f"found shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
        return x.to(torch.float32) * (2.0 / 255.0) - 1.0
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, found {x.dtype}")
    return x.to(torch.float32)


def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ProxyClassifier(nn.Module):
    """Four 3x3 conv-BN-ReLU layers with 2x2 max pools between, global average pool, linear head.

    ``forward`` gives logits; ``features`` the pooled penultimate activations (``feature_dim`` = the
    last conv width, 128) used for proxy FID/KID, like Inception's pool3 features for real FID.
    Input: float ``[N, 3, H, W]`` in [-1, 1] (or uint8 NHWC); any H, W is resized to ``img_size``.
    Kept small (about 195k parameters, 0.76 MB in fp32) so it trains on a laptop CPU in minutes.

    ``aux`` is a linear head trained alongside the classifier to predict the image downsampled to
    ``aux_size`` x ``aux_size``. Shape labels alone make the features nearly blind to colour (hues
    are random per class), and colour and layout are exactly what the first, noisiest sampling
    steps (the shallow model's share in DuoDiff) decide; the auxiliary target keeps them in the
    features. It is not used at evaluation time.
    """

    def __init__(self, num_classes: int = 10, channels=(32, 64, 96, 128), img_size: int = 32,
                 aux_size: int = 4):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.num_classes, self.img_size, self.channels = int(num_classes), int(img_size), tuple(channels)
        self.feature_dim = c4
        self.body = nn.Sequential(
            _conv_bn(3, c1), nn.MaxPool2d(2),   # (N, c1, S/2, S/2)
            _conv_bn(c1, c2), nn.MaxPool2d(2),  # (N, c2, S/4, S/4)
            _conv_bn(c2, c3), nn.MaxPool2d(2),  # (N, c3, S/8, S/8)
            _conv_bn(c3, c4),                   # (N, c4, S/8, S/8)
        )
        self.head = nn.Linear(c4, num_classes)
        self.aux_size = int(aux_size)
        self.aux = nn.Linear(c4, 3 * aux_size * aux_size)
        self.meta: dict[str, str] = {}

    # ---- model ---------------------------------------------------------------

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = as_float_images(x)
        if x.shape[1] != 3:
            raise ValueError(f"ProxyClassifier expects 3-channel images, found {x.shape[1]} channels")
        p = next(self.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        if x.shape[-2:] != (self.img_size, self.img_size):
            # antialias: downsampling 64/256-pixel samples without it would alias fine texture
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable features of a prepared batch: ``[N, 3, S, S]`` -> ``[N, feature_dim]``."""
        return self.body(x).mean(dim=(2, 3))  # (N, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self._prepare(x)))  # (N, num_classes)

    def training_outputs(self, x: torch.Tensor):
        """``(logits [N, K], aux prediction [N, 3*a*a], aux target [N, 3*a*a])`` for training."""
        x = self._prepare(x)
        f = self.embed(x)
        target = F.adaptive_avg_pool2d(x, self.aux_size).flatten(1)  # (N, 3*a*a)
        return self.head(f), self.aux(f), target

    # ---- batched inference ---------------------------------------------------

    @torch.no_grad()
    def features(self, images, batch_size: int = 500) -> torch.Tensor:
        """Pooled penultimate features, float32 ``[N, feature_dim]`` on the CPU (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            x = images if isinstance(images, torch.Tensor) else as_float_images(images)
            out = [self.embed(self._prepare(x[i:i + batch_size])).float().cpu()
                   for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 500) -> torch.Tensor:
        """Predicted class of each image, int64 ``[N]``."""
        f = self.features(images, batch_size).to(self.head.weight.device, self.head.weight.dtype)
        return self.head(f).argmax(dim=1).cpu()

    # ---- weights -------------------------------------------------------------

    def save(self, path: str, metadata: dict | None = None) -> None:
        """Write weights (fp32) and string metadata to a safetensors file."""
        from safetensors.torch import save_file
        meta = dict(num_classes=str(self.num_classes), img_size=str(self.img_size),
                    channels=",".join(map(str, self.channels)), feature_dim=str(self.feature_dim),
                    aux_size=str(self.aux_size))
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(sd, path, metadata=meta)

    @classmethod
    def load(cls, path: str | None = None, device=None) -> "ProxyClassifier":
        """Load the shipped weights (or ``path``) offline; returns the model in eval mode.

        ``model.meta`` holds the file's metadata plus ``sha256`` (first 16 hex digits of the file).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = path or DEFAULT_WEIGHTS
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"proxy classifier weights not found at {path}; the package ships them in "
                f"duodiff_fast/assets/ (regenerate with `python tools/train_proxy_classifier.py`)")
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        channels = tuple(int(c) for c in meta.get("channels", "32,64,96,128").split(","))
        model = cls(num_classes=int(meta.get("num_classes", 10)), channels=channels,
                    img_size=int(meta.get("img_size", 32)), aux_size=int(meta.get("aux_size", 4)))
        model.load_state_dict(load_file(path), strict=True)
        with open(path, "rb") as f:  # identifies the weights in cached reference features and reports
            meta["sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
        model.meta = meta
        return model.to(device or "cpu").eval()

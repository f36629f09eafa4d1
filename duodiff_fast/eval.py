"""Quality evaluation: fidelity to deep-only sampling, proxy FID/KID offline, real FID/KID with Inception.

Three kinds of numbers, all computed on samples written by ``duodiff-fast sample`` (``samples.npz``
with ``arr_0`` uint8 NHWC and optional ``labels``) or on tensors:

- ``fidelity(samples, reference)``: MSE and PSNR between DuoDiff samples and deep-only samples drawn
  from the same noise (image ``i`` against image ``i``). This is the offline quality check per switch
  point: at ``switch=0`` it is exact, and it falls as more steps go to the shallow model.
- ``proxy_fid`` / ``proxy_kid``: Frechet distance and kernel distance in the 128-d features of a
  small classifier trained on the built-in Shapes dataset (``duodiff_fast.proxy``, weights shipped).
  Offline and cheap; comparable across runs of this library only, not with published FIDs, and
  meaningful for Shapes-like images only.
- ``fid_kid``: the real metrics, with torch-fidelity's Inception-v3 feature extractor (the TF-ported
  2015-12-05 weights used by every published FID) loaded from a local file the user passes. Nothing
  is downloaded.

``frechet_distance`` and ``kernel_inception_distance`` implement the same estimators as
torch-fidelity / pytorch-fid (FID with ``scipy.linalg.sqrtm``; KID as the unbiased MMD^2 with the
cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over random subsets).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np
import torch

from . import _io
from .proxy import ProxyClassifier, as_float_images

__all__ = [
    "load_images", "fidelity", "frechet_distance", "feature_statistics", "kernel_inception_distance",
    "reference_images", "proxy_features", "proxy_fid", "proxy_kid", "inception_features", "fid_kid",
    "add_cli", "SHAPES_REFERENCE_SEED", "INCEPTION_WEIGHTS_URL", "class_accuracy", "bootstrap_interval",
    "fid_interval", "paired_fid_difference",
]

# Held-out seed for the Shapes reference set: differs from the default training seed (0) and from
# the proxy classifier's train/test seeds (1001/1002), so the reference is images nobody trained on.
SHAPES_REFERENCE_SEED = 4242
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


# -----------------------------------------------------------------------------
# Loading images
# -----------------------------------------------------------------------------

def _load_npz(path: str):
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        for key in ("arr_0", "images", "samples", "latents"):
            if key in files:
                x = z[key]
                break
        else:
            raise ValueError(f"{path}: expected images under 'arr_0' (uint8 NHWC, as written by "
                             f"`duodiff-fast sample`), 'images' or 'latents'; found {sorted(files)}")
        labels = z["labels"] if "labels" in files else None
    return x, labels


def load_images(src, with_labels: bool = False):
    """Images from an ``.npz`` path, a tensor or an array -> float32 ``[N, C, H, W]`` in [-1, 1].

    uint8 data is pixels 0..255 (NHWC in ``samples.npz``); float data is NCHW as stored (latents
    included). With ``with_labels`` returns ``(images, labels or None)``.
    """
    labels = None
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such samples file: {path}")
        x, labels = _load_npz(path)
    else:
        x = src
    images = as_float_images(x)
    if labels is not None:
        labels = torch.from_numpy(np.asarray(labels)).reshape(-1).to(torch.int64)
    return (images, labels) if with_labels else images


# -----------------------------------------------------------------------------
# Fidelity to deep-only sampling
# -----------------------------------------------------------------------------

def fidelity(samples, reference) -> dict:
    """MSE and PSNR of ``samples`` against ``reference`` sampled from the same noise, image by image.

    Both are images in [-1, 1] (tensors, arrays or ``.npz`` paths; uint8 is mapped to [-1, 1]).
    MSE is on that [-1, 1] scale; PSNR uses the peak-to-peak range 2, i.e. ``10 log10(4 / MSE)``,
    which equals the usual PSNR of images on a [0, 1] scale. Returns ``mse`` (mean over images),
    ``psnr`` (of that mean MSE; ``inf`` only if all images are identical), ``psnr_mean`` (mean of the
    per-image PSNRs, ``inf`` if any image is identical), ``mse_per_image`` and ``psnr_per_image``
    (float64 arrays) and ``n``.
    """
    a, la = load_images(samples, with_labels=True)
    b, lb = load_images(reference, with_labels=True)
    if a.shape != b.shape:
        raise ValueError(f"fidelity pairs image i of the samples with image i of the reference, but their "
                         f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if la is not None and lb is not None and not torch.equal(la, lb):
        raise ValueError("fidelity: samples and reference have different labels; they must come from the "
                         "same noise and the same classes (same --seed and --n in `duodiff-fast sample`)")
    if a.shape[0] == 0:
        raise ValueError("fidelity: no images")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).numpy()  # (N,)
    with np.errstate(divide="ignore"):  # identical images: PSNR = inf
        psnr = 10.0 * np.log10(4.0 / mse)
        psnr_pooled = 10.0 * np.log10(4.0 / np.float64(mse.mean()))
    return dict(mse=float(mse.mean()), psnr=float(psnr_pooled), psnr_mean=float(psnr.mean()),
                mse_per_image=mse, psnr_per_image=psnr, n=int(mse.shape[0]))


# -----------------------------------------------------------------------------
# Distances between feature distributions
# -----------------------------------------------------------------------------

def _np64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of features ``[N, F]``."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features [N >= 2, F], found shape {list(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = tr sqrt(A S2 A) with A = S1^(1/2): the right side is symmetric PSD, so a
    # symmetric eigen-decomposition is stable where the non-symmetric product is not.
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    from scipy import linalg
    with warnings.catch_warnings():
        # scipy warns on singular products (fewer samples than dims, dead features); the result is
        # checked below instead, as pytorch-fid does with disp=False.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary component ({imag:.3g}); "
                             "the covariances are ill-conditioned (use more samples)")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "auto") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64. ``method``: ``'sqrtm'``
    (scipy's Schur square root of the product, as torch-fidelity and pytorch-fid do), ``'eigh'`` (the
    symmetric form ``tr sqrt(S1^(1/2) S2 S1^(1/2))``, numpy only) or ``'auto'`` (sqrtm when scipy is
    installed). Both agree to float64 round-off on well-conditioned inputs.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    if method == "auto":
        method = "sqrtm" if importlib.util.find_spec("scipy") is not None else "eigh"
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"frechet_distance: method must be 'auto', 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def kernel_inception_distance(f1, f2, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                              gamma: float | None = None, coef0: float = 1.0, seed: int = 0):
    """KID: unbiased MMD^2 with the kernel ``(gamma x.y + coef0)^degree`` (gamma = 1/F), over subsets.

    Draws ``subsets`` random subsets of ``min(subset_size, N1, N2)`` rows from each feature set
    (without replacement, ``numpy`` RandomState(seed)); returns ``(mean, std)`` of the estimates.
    When both sets have at most ``subset_size`` rows every subset is the whole set: one estimate,
    std 0.
    The estimator is unbiased, so two samples of one distribution give values around 0 (either sign).
    """
    x, y = _np64(f1), _np64(f2)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel_inception_distance: expected features [N1, F] and [N2, F], "
                         f"found {list(x.shape)} and {list(y.shape)}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("kernel_inception_distance needs at least 2 samples on each side")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    if m == x.shape[0] == y.shape[0]:
        subsets = 1  # every subset is all rows, and kernel sums do not depend on their order
    rng = np.random.RandomState(seed)
    est = np.empty(subsets)
    for s in range(subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (gamma * a @ a.T + coef0) ** degree
        kyy = (gamma * b @ b.T + coef0) ** degree
        kxy = (gamma * a @ b.T + coef0) ** degree
        est[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                  - 2.0 * kxy.mean())
    return float(est.mean()), float(est.std())


# -----------------------------------------------------------------------------
# Reference sets and feature caching
# -----------------------------------------------------------------------------

def _is_images_file(ref) -> bool:
    # any other string is a dataset spec (get_dataset also recognises bare folders and archives)
    return isinstance(ref, (str, os.PathLike)) and os.fspath(ref).endswith(".npz")


def reference_images(spec: str, n: int = 5000) -> torch.Tensor:
    """``n`` reference images from a dataset spec (``duodiff_fast.data.get_dataset``).

    ``'shapes'`` / ``'shapes:<size>'`` (and ``'shapes-bold'``) renders ``Shapes(n, seed=SHAPES_REFERENCE_SEED)``,
    a held-out seed; other datasets give a fixed random subset of ``n`` items (all of them if fewer).
    """
    from .data import SHAPES_SPECS, get_dataset
    name = spec.partition(":")[0].strip().lower()
    if name in SHAPES_SPECS:
        ds = get_dataset(spec, n=n, seed=SHAPES_REFERENCE_SEED)
        idx = torch.arange(n)
    else:
        ds = get_dataset(spec)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    out = [ds.batch(idx[i:i + 1000])[0] for i in range(0, len(idx), 1000)]
    return torch.cat(out)


def _cache_key(reference, n: int, tag: str) -> str:
    if _is_images_file(reference):
        st = os.stat(reference)
        ident = f"{os.path.abspath(reference)}|{st.st_size}|{st.st_mtime_ns}"
    else:
        ident = f"{reference}|{n}|{SHAPES_REFERENCE_SEED}"
    return hashlib.sha1(f"{tag}|{ident}".encode()).hexdigest()[:16]


def _reference_features(reference, n: int, extract, tag: str, cache_dir: str | None) -> torch.Tensor:
    """Features of a reference (images, ``.npz`` path or dataset spec), optionally cached as .npz."""
    cacheable = isinstance(reference, (str, os.PathLike)) and cache_dir
    if cacheable:
        path = os.path.join(cache_dir, f"ref_features_{_cache_key(reference, n, tag)}.npz")
        if os.path.isfile(path):
            with np.load(path) as z:
                return torch.from_numpy(z["features"])
    if isinstance(reference, (str, os.PathLike)) and not _is_images_file(reference):
        images = reference_images(os.fspath(reference), n)
    else:
        images = load_images(reference)
    feats = extract(images)
    if cacheable:
        _io.savez(path, features=feats.numpy(), reference=str(reference), tag=tag)
    return feats


# -----------------------------------------------------------------------------
# Proxy FID / KID (offline, shipped classifier)
# -----------------------------------------------------------------------------

def _classifier_tag(clf: ProxyClassifier) -> str:
    return f"proxy|{clf.meta.get('sha256', '')}"


def proxy_features(samples, reference, batch_size: int = 500, reference_n: int = 5000,
                   classifier: ProxyClassifier | None = None, cache_dir: str | None = None, device=None):
    """Proxy-classifier features of samples and reference: ``(f_samples [N, F], f_ref [M, F])``."""
    clf = classifier or ProxyClassifier.load(device=device)
    f_s = clf.features(load_images(samples), batch_size)
    f_r = _reference_features(reference, reference_n, lambda x: clf.features(x, batch_size),
                              _classifier_tag(clf), cache_dir)
    return f_s, f_r


def proxy_fid(samples, reference="shapes", batch_size: int = 500, reference_n: int = 5000,
              classifier: ProxyClassifier | None = None, cache_dir: str | None = None, device=None) -> float:
    """FID in the proxy classifier's features. ``reference``: images, an ``.npz`` or a dataset spec."""
    f_s, f_r = proxy_features(samples, reference, batch_size, reference_n, classifier, cache_dir, device)
    return frechet_distance(*feature_statistics(f_s), *feature_statistics(f_r))


def proxy_kid(samples, reference="shapes", batch_size: int = 500, reference_n: int = 5000,
              classifier: ProxyClassifier | None = None, cache_dir: str | None = None, device=None,
              subsets: int = 100, subset_size: int = 1000):
    """KID ``(mean, std)`` in the proxy classifier's features."""
    f_s, f_r = proxy_features(samples, reference, batch_size, reference_n, classifier, cache_dir, device)
    return kernel_inception_distance(f_s, f_r, subsets, subset_size)


# -----------------------------------------------------------------------------
# Class accuracy and bootstrap intervals
# -----------------------------------------------------------------------------

def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> torch.Tensor:
    """``[n_boot, n]`` int64 resampling indices (with replacement), a pure function of the seed."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_boot, n), generator=g)


def bootstrap_interval(stat, n: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval ``(low, high)`` of ``stat(idx)`` over resampled index sets (``stat``
    maps an int64 index tensor ``[n]`` to a float). FID rises when points repeat, so its interval sits a
    little above the point estimate; compare modes with the paired difference instead."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    vals = np.array([stat(idx) for idx in bootstrap_indices(n, n_boot, seed)], dtype=np.float64)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def class_accuracy(images, labels, classifier: ProxyClassifier | None = None, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95, device=None) -> dict:
    """Share of ``images`` the shipped proxy classifier assigns to the class they were sampled for.

    ``images``: float ``[N, 3, H, W]`` in [-1, 1] or uint8 NHWC (a ``samples.npz`` path too); ``labels``:
    int ``[N]`` in ``[0, num_classes)``. Returns ``acc``, ``low``/``high`` (percentile bootstrap interval
    over images), ``per_class`` (NaN where a class was never asked for), ``n`` and ``pred``."""
    clf = classifier or ProxyClassifier.load(device=device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    pred = clf.predict(load_images(images))
    if pred.shape[0] != labels.shape[0]:
        raise ValueError(f"class_accuracy: {pred.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("class_accuracy: no images")
    if int(labels.min()) < 0 or int(labels.max()) >= clf.num_classes:
        raise ValueError(f"class_accuracy: labels must be in [0, {clf.num_classes}) (the proxy classifier's "
                         f"classes), found [{int(labels.min())}, {int(labels.max())}]")
    correct = (pred == labels).double()
    lo, hi = bootstrap_interval(lambda i: float(correct[i].mean()), len(correct), n_boot, seed, level)
    per_class = [float(correct[labels == c].mean()) if bool((labels == c).any()) else float("nan")
                 for c in range(clf.num_classes)]
    return dict(acc=float(correct.mean()), low=lo, high=hi, per_class=per_class, n=int(len(correct)), pred=pred)


def paired_accuracy_difference(pred_a, pred_b, labels, n_boot: int = 1000, seed: int = 0,
                               level: float = 0.95) -> dict:
    """Class accuracy of ``pred_a`` minus that of ``pred_b`` (predicted classes ``[N]`` for images sampled
    from the same noise and label, ``labels`` ``[N]``), with a paired bootstrap interval: each resample
    takes the same indices from both, so the noise the two share cancels. An interval containing 0 means
    the two are not told apart at this sample count."""
    a, b, y = (torch.as_tensor(np.asarray(v), dtype=torch.int64).reshape(-1) for v in (pred_a, pred_b, labels))
    if not a.shape == b.shape == y.shape:
        raise ValueError(f"paired_accuracy_difference: {a.shape[0]} and {b.shape[0]} predictions for "
                         f"{y.shape[0]} labels; the two sets must be paired sample by sample")
    if y.numel() == 0:
        raise ValueError("paired_accuracy_difference: no samples")
    d = (a == y).double() - (b == y).double()
    lo, hi = bootstrap_interval(lambda i: float(d[i].mean()), len(d), n_boot, seed, level)
    return dict(diff=float(d.mean()), low=lo, high=hi, n=int(len(d)))


def _fid_of(f: np.ndarray, ref_mu, ref_sigma) -> float:
    # The symmetric-eigen form: ~50x faster than scipy's sqrtm at 128 features (hundreds of bootstrap
    # resamples), equal to float64 round-off on well-conditioned covariances.
    return frechet_distance(*feature_statistics(f), ref_mu, ref_sigma, method="eigh")


def fid_interval(features, ref_mu, ref_sigma, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """FID of ``features`` ``[N, F]`` against fixed reference statistics, with a percentile bootstrap
    interval over the samples (the reference, thousands of images, is held fixed)."""
    f = np.asarray(features, dtype=np.float64)
    lo, hi = bootstrap_interval(lambda i: _fid_of(f[i.numpy()], ref_mu, ref_sigma), len(f), n_boot, seed, level)
    return dict(fid=_fid_of(f, ref_mu, ref_sigma), low=lo, high=hi)


def paired_fid_difference(features_a, features_b, ref_mu, ref_sigma, n_boot: int = 200, seed: int = 0,
                          level: float = 0.95) -> dict:
    """FID(a) - FID(b) with a paired bootstrap interval: sample ``i`` of ``a`` and of ``b`` come from the same
    noise and label, so each resample takes the same indices from both. An interval containing 0 means
    the two are not told apart at this sample count."""
    fa, fb = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if fa.shape != fb.shape:
        raise ValueError(f"paired_fid_difference: feature shapes differ, {fa.shape} vs {fb.shape}")

    def stat(i):
        i = i.numpy()
        return _fid_of(fa[i], ref_mu, ref_sigma) - _fid_of(fb[i], ref_mu, ref_sigma)

    lo, hi = bootstrap_interval(stat, len(fa), n_boot, seed, level)
    return dict(diff=_fid_of(fa, ref_mu, ref_sigma) - _fid_of(fb, ref_mu, ref_sigma), low=lo, high=hi)


# -----------------------------------------------------------------------------
# Real FID / KID: torch-fidelity's Inception-v3, weights from a local file
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# Denoiser probes: does a model read its label, can it pass noise through?
# -----------------------------------------------------------------------------

def _model_time(model, sched, t: int, n: int):
    return sched.model_time(torch.full((n,), int(t)), model.time_convention).float()


@torch.no_grad()
def label_probe(model, data: str = "shapes", n: int = 200, ts=(100, 300, 500, 700, 900), seed: int = 0) -> list:
    """Per ``t`` in ``ts``, on ``n`` held-out images of ``data`` noised to ``t``: the eps MSE with the right
    label (``mse_right``), a wrong one (``mse_wrong``: true + 1..K-1 at random) and the null class
    (``mse_null``), and ``label_effect`` = mean |eps(right) - eps(null)| / mean |eps(right)|.

    A class-conditional model that uses its label has ``mse_right < mse_wrong`` where the class is still
    open (mid t); one whose ``label_effect`` is ~0.003 ignores it, and its samples are classes by chance.
    Needs a discrete-schedule, class-conditional model with a null class (the demo pair)."""
    from .data import SHAPES_SPECS, get_dataset
    from .sampling import get_schedule
    if not getattr(model, "num_classes", 0) or getattr(model, "null_class", None) is None:
        raise ValueError("label_probe: the model must be class-conditional with a null class")
    was = model.training
    model.eval()
    ds = get_dataset(data, n=n, seed=SHAPES_REFERENCE_SEED + 1, img_size=model.img_size) \
        if data.partition(":")[0].strip().lower() in SHAPES_SPECS else get_dataset(data)
    n = min(n, len(ds))
    x0, y = ds.batch(range(n))
    x0 = x0.to(next(model.parameters()).device)
    y = y.to(x0.device)
    g = torch.Generator().manual_seed(seed)
    K = int(ds.num_classes)
    wrong = (y + torch.randint(1, max(K, 2), (n,), generator=g).to(y.device)) % max(K, 2)
    null = torch.full_like(y, model.null_class)
    sched = get_schedule(model.schedule_spec)
    rows = []
    for t in ts:
        ab = float(sched.alphas_cumprod[int(t)])
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
        tm = _model_time(model, sched, t, n).to(x0.device)
        e_r, e_w, e_n = (model(xt, tm, lab)[:, :x0.shape[1]] for lab in (y, wrong, null))
        rows.append(dict(t=int(t), mse_right=float((e_r - eps).square().mean()),
                         mse_wrong=float((e_w - eps).square().mean()),
                         mse_null=float((e_n - eps).square().mean()),
                         label_effect=float((e_r - e_n).abs().mean() / e_r.abs().mean().clamp_min(1e-12))))
    model.train(was)
    return rows


@torch.no_grad()
def passthrough_probe(model, t: int = 999, n: int = 64, patch: int | None = None, seed: int = 0) -> dict:
    """How well an eps-predictor returns pure noise at timestep ``t`` (near T, the optimal eps is x_t).

    Returns ``mse`` (eps_pred vs x_t), per patch the least-squares ``gain`` of eps_pred on x_t: ``gain_std``
    (0 for a perfect pass-through) and ``gain_norm_corr`` (correlation of the gain with the patch norm:
    near -1 when every output patch leaves with the same norm, what a per-token LayerNorm head does
    until training has taught it to carry the norm through), and ``cosine`` (mean per-patch direction
    agreement). In x0 = (x_t - sigma eps) / alpha, an eps error of 0.01 at t = 999 is an error of about 17."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    S, C = model.img_size, model.in_channels
    p = int(patch or getattr(model, "patch_size", 1))
    dev = next(model.parameters()).device
    x = torch.randn(n, C, S, S, generator=g).to(dev)
    nc = int(getattr(model, "num_classes", 0) or 0)
    y = torch.randint(0, max(1, nc - 1), (n,), generator=g).to(dev) if nc else None
    from .sampling import get_schedule
    tm = _model_time(model, get_schedule(model.schedule_spec), t, n).to(dev)
    e = (model(x, tm, y) if y is not None else model(x, tm))[:, :C]
    model.train(was)

    def patches(z):  # (n, L, C*p*p)
        return z.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, C * p * p)

    xp, ep = patches(x), patches(e)
    gain = (ep * xp).sum(-1) / xp.square().sum(-1)
    corr = torch.corrcoef(torch.stack([gain.flatten(), xp.norm(dim=-1).flatten()]))[0, 1]
    cos = torch.nn.functional.cosine_similarity(ep, xp, dim=-1).mean()
    return dict(t=int(t), mse=float((e - x).square().mean()), gain_std=float(gain.std()),
                gain_norm_corr=float(corr), cosine=float(cos))


def _check_inception_weights(path) -> str:
    how = (f"download it once (e.g. `wget {INCEPTION_WEIGHTS_URL}`; it is torch-fidelity's "
           f"pt_inception-2015-12-05 file, 91 MB) and pass its path with --inception-weights / "
           f"inception_weights=; nothing is downloaded at run time")
    if path is None:
        raise FileNotFoundError(f"real FID/KID need the Inception-v3 weights file, and none was given: {how}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception-v3 weights file not found: {path}; {how}")
    return path


def _inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3``, importable with or without torchvision."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ImportError as e:
        if e.name != "torchvision":
            raise ImportError("real FID/KID use torch-fidelity's Inception-v3 feature extractor: "
                              "`pip install torch-fidelity` (it needs no torchvision here)") from e
    # torch_fidelity/__init__ imports its CLIP extractor, which needs torchvision; the Inception
    # module itself needs only torch. Import it under a bare stand-in for the package so that the
    # package __init__ never runs, then take the stand-in away again.
    mod_name = "torch_fidelity.feature_extractor_inceptionv3"
    if mod_name not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
        try:
            importlib.import_module(mod_name)
        finally:
            if sys.modules.get("torch_fidelity") is stub:
                del sys.modules["torch_fidelity"]
    return sys.modules[mod_name].FeatureExtractorInceptionV3


def _inception(weights: str, device):
    cls = _inception_class()
    try:
        # torch-fidelity loads the file with torch.load(weights_only=False): use files you trust.
        model = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    except RuntimeError as e:
        raise RuntimeError(f"{weights}: not torch-fidelity's Inception-v3 weights ({e})") from e
    return model.to(device)


def _to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    x = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"Inception features need RGB images, found {x.shape[1]} channels (latents must "
                         "be decoded first)")
    return x.contiguous()


@torch.no_grad()
def inception_features(images, inception_weights, batch_size: int = 100, device=None, _model=None):
    """Inception-v3 pool3 features ``[N, 2048]`` (torch-fidelity's extractor, uint8 input)."""
    weights = _check_inception_weights(inception_weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _model or _inception(weights, device)
    x = _to_uint8_nchw(load_images(images))
    out = [model(x[i:i + batch_size].to(device))[0].double().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def _inception_extractor(inception_weights, batch_size: int, device):
    """``(extract, cache_tag)``: one loaded Inception model behind a features function."""
    weights = _check_inception_weights(inception_weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _inception(weights, device)
    extract = lambda x: inception_features(x, weights, batch_size, device, _model=model)  # noqa: E731
    return extract, f"inception|{os.path.basename(weights)}|{os.path.getsize(weights)}"


def _distances(f_s, f_r, kid_subsets: int, kid_subset_size: int) -> dict:
    fid = frechet_distance(*feature_statistics(f_s), *feature_statistics(f_r))
    kid_mean, kid_std = kernel_inception_distance(f_s, f_r, kid_subsets, kid_subset_size)
    return dict(fid=fid, kid_mean=kid_mean, kid_std=kid_std, n=int(f_s.shape[0]),
                n_reference=int(f_r.shape[0]))


def fid_kid(samples, reference, inception_weights=None, batch_size: int = 100, reference_n: int = 50_000,
            kid_subsets: int = 100, kid_subset_size: int = 1000, cache_dir: str | None = None,
            device=None) -> dict:
    """Real FID and KID with Inception-v3 (torch-fidelity's extractor) loaded from a local file.

    ``inception_weights``: path to ``weights-inception-2015-12-05-6726825d.pth`` (raises
    ``FileNotFoundError`` with the download URL as text when it is None or missing; nothing is
    downloaded). ``reference``: images, an ``.npz`` or a dataset spec (``reference_n`` items).
    Returns ``dict(fid, kid_mean, kid_std, n, n_reference)``.
    """
    extract, tag = _inception_extractor(inception_weights, batch_size, device)
    f_s = extract(samples)
    f_r = _reference_features(reference, reference_n, extract, tag, cache_dir)
    return _distances(f_s, f_r, kid_subsets, kid_subset_size)


# -----------------------------------------------------------------------------
# CLI: duodiff-fast eval
# -----------------------------------------------------------------------------

METRICS = ("fidelity", "proxy_fid", "proxy_kid", "fid", "kid", "class_acc")


def _sample_meta(path: str) -> dict:
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), "samples.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    return {}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
    return str(v)


def cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    if metrics is None:
        metrics = (["fidelity"] if args.reference else []) + ["proxy_fid", "proxy_kid"]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"eval: unknown metric(s) {unknown}; choose from {','.join(METRICS)}")
    if "fidelity" in metrics and not args.reference:
        raise ValueError("eval: fidelity needs --reference: deep-only samples from the same "
                         "noise (`duodiff-fast sample --switch 0` with the same --seed and --n)")
    dist_ref = args.reference_data or args.reference
    if any(m not in ("fidelity", "class_acc") for m in metrics) and dist_ref is None:
        raise ValueError("eval: proxy_fid/proxy_kid/fid/kid need --reference-data (e.g. shapes) "
                         "or --reference PATH.npz")
    if ("fid" in metrics or "kid" in metrics):
        try:
            _check_inception_weights(args.inception_weights)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"eval: {e}") from None

    for path in list(args.samples) + ([args.reference] if args.reference else []):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"eval: no such samples file: {path}")
    if "class_acc" in metrics:  # labels are needed: check every file before computing anything
        for path in args.samples:
            if load_images(path, with_labels=True)[1] is None:
                raise ValueError(f"eval: class_acc needs the labels the samples were drawn for, and {path} has "
                                 "no 'labels' array (class-conditional `duodiff-fast sample` writes one)")
    if args.out:
        _io.check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Feature extractors and reference features once, shared by every --samples file.
    extractors = {}
    if {"proxy_fid", "proxy_kid"} & set(metrics):
        clf = ProxyClassifier.load(device=device)
        extractors["proxy"] = ((lambda x: clf.features(x, args.batch_size)), _classifier_tag(clf))
    if {"fid", "kid"} & set(metrics):
        extractors["inception"] = _inception_extractor(args.inception_weights, 100, device)
    refs = {name: _reference_features(dist_ref, args.reference_n, fn, tag, args.cache_dir)
            for name, (fn, tag) in extractors.items()}
    rows = []
    for path in args.samples:
        meta = _sample_meta(path)
        row = dict(samples=path, switch=meta.get("switch"), shallow_steps=meta.get("shallow_steps"),
                   steps=meta.get("steps"))
        if "fidelity" in metrics:
            r = fidelity(path, args.reference)
            row.update(mse=r["mse"], psnr=r["psnr"], psnr_mean=r["psnr_mean"], n=r["n"])
        if "class_acc" in metrics:
            images, labels = load_images(path, with_labels=True)
            r = class_accuracy(images, labels, device=device)
            row.update(class_acc=r["acc"], class_acc_low=r["low"], class_acc_high=r["high"], n=r["n"])
        for name, (fn, _) in extractors.items():
            r = _distances(fn(load_images(path)), refs[name], 100, 1000)
            prefix = "proxy_" if name == "proxy" else ""
            row["n"] = r["n"]
            if prefix + "fid" in metrics:
                row[prefix + "fid"] = r["fid"]
            if prefix + "kid" in metrics:
                row[prefix + "kid"], row[prefix + "kid_std"] = r["kid_mean"], r["kid_std"]
        rows.append(row)

    cols = [c for c in ("samples", "switch", "shallow_steps", "n", "mse", "psnr", "class_acc", "class_acc_low",
                        "class_acc_high", "proxy_fid", "proxy_kid", "fid", "kid")
            if any(c in r and r[c] is not None for r in rows)]
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    if args.out:
        out = dict(reference=args.reference, reference_data=args.reference_data, metrics=metrics, rows=rows,
                   proxy_classifier=dict(clf.meta) if "proxy" in extractors else None)
        _io.write_json(args.out, out)  # inf PSNR (identical images) is written as Infinity
        print(f"wrote {args.out}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``duodiff-fast eval`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="fidelity to deep-only samples, proxy FID/KID (offline), FID/KID (Inception file)",
        description="Evaluate samples.npz files: one row per --samples file (e.g. one per switch point).")
    p.add_argument("--samples", nargs="+", required=True,
                   help="samples.npz file(s) from `duodiff-fast sample`")
    p.add_argument("--reference", default=None,
                   help="deep-only samples.npz from the same noise (for fidelity; also the distribution "
                        "reference when --reference-data is not given)")
    p.add_argument("--reference-data", default=None,
                   help="dataset spec for the distribution metrics, e.g. 'shapes' (held-out seed) or "
                        "'cifar10:/path'")
    p.add_argument("--reference-n", type=int, default=5000,
                   help="reference images taken from --reference-data")
    p.add_argument("--metrics", default=None,
                   help=f"comma list from {','.join(METRICS)} (default: fidelity if --reference, "
                        "proxy_fid, proxy_kid); class_acc: the proxy classifier's accuracy on the labels the "
                        "samples were drawn for, with a 95%% bootstrap interval")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 weights for fid/kid (torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--cache-dir", default=None, help="cache reference features here")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)


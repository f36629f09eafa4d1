"""Tests for duodiff_fast.data: the built-in Shapes set, the loaders, errors, and image grids."""
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duodiff_fast.data import (
    SHAPE_CLASSES, Shapes, cifar10, get_dataset, image_folder, latent_features, npz_images, save_grid,
    to_uint8,
)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _maxdiff(a, b):
    d = (a.float() - b.float()).abs()
    return f"max |diff| {d.max().item():.3g}, mean {d.mean().item():.3g}"


# -----------------------------------------------------------------------------
# Shapes
# -----------------------------------------------------------------------------

def test_shapes_items_shapes_dtypes_range():
    for size in (32, 19, 64):
        ds = Shapes(50, img_size=size, seed=1)
        assert (len(ds), ds.img_size, ds.channels, ds.num_classes) == (50, size, 3, 10)
        x, y = ds[7]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 0 and y.item() == 7
        xb, yb = ds.batch(range(50))
        assert xb.shape == (50, 3, size, size) and yb.shape == (50,) and yb.dtype == torch.int64
        assert torch.isfinite(xb).all() and xb.min() >= -1 and xb.max() <= 1
        # Real-looking images use the range: neither flat nor saturated.
        assert 0.2 < xb.std().item() < 0.8, xb.std().item()
        assert (xb.abs() == 1).float().mean() < 0.05


def test_shapes_deterministic_by_seed_and_independent_of_batching():
    a = Shapes(500, 32, seed=3)
    b = Shapes(500, 32, seed=3)
    c = Shapes(500, 32, seed=4)
    idx = [0, 5, 17, 499, 42, 3]
    xa, ya = a.batch(idx)
    xb, yb = b.batch(idx)
    assert torch.equal(xa, xb), _maxdiff(xa, xb)
    assert torch.equal(ya, yb)
    # Item i is a function of (seed, i) only: same pixels alone, in another order, in another batch.
    for k, i in enumerate(idx):
        xi, yi = a[i]
        assert torch.allclose(xi, xa[k], atol=1e-6), f"item {i}: {_maxdiff(xi, xa[k])}"
        assert yi == ya[k]
    xr, _ = a.batch(idx[::-1])
    assert torch.allclose(xr.flip(0), xa, atol=1e-6), _maxdiff(xr.flip(0), xa)
    assert torch.allclose(a[-1][0], a[499][0], atol=1e-6)
    # Another seed: same labels (balanced by index), different pixels.
    xc, yc = c.batch(idx)
    assert torch.equal(yc, ya)
    per_item = (xc - xa).abs().flatten(1).mean(1)
    assert (per_item > 0.05).all(), per_item
    # Different items of one seed differ as well.
    assert (xa[0] - a[10][0]).abs().mean() > 0.05
    with pytest.raises(IndexError, match="500"):
        a[500]


def test_shapes_class_balance_and_subsets():
    ds = Shapes(1000, 16, seed=0)
    counts = torch.bincount(ds.labels(), minlength=10)
    assert counts.tolist() == [100] * 10
    assert ds.classes == SHAPE_CLASSES
    ds4 = Shapes(40, 16, seed=0, num_classes=4)
    assert ds4.num_classes == 4 and ds4.classes == SHAPE_CLASSES[:4]
    assert torch.bincount(ds4.batch(range(40))[1]).tolist() == [10] * 4
    with pytest.raises(ValueError, match="num_classes"):
        Shapes(10, num_classes=11)


def test_shapes_generation_speed():
    # CPU time on one thread: the test machines are shared, and wall time (or two OpenMP threads
    # waiting on each other) then measures the neighbours rather than the renderer.
    ds = Shapes(10_000, 32, seed=0)
    ds.batch(range(256))  # first call builds the grain bank
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for r in range(3):
            t0 = time.process_time()
            ds.batch(torch.arange(256) + 256 * (r + 1))
            best = min(best, time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    print(f"Shapes: 256 images at 32x32 in {best * 1e3:.1f} ms CPU (best of 3, one thread)")
    assert best < 0.5, f"{best:.3f} s CPU for 256 images"


def _shift_invariant_features(x):
    """|FFT| of the grey-level edge energy: invariant to where the shape sits in the image."""
    g = x.mean(1)  # (N, H, W)
    e = (g[:, :-1, 1:] - g[:, :-1, :-1]).square() + (g[:, 1:, :-1] - g[:, :-1, :-1]).square()
    f = torch.fft.rfft2(e - e.mean((1, 2), keepdim=True)).abs().flatten(1)
    return f / (f.norm(dim=1, keepdim=True) + 1e-8)


def test_shapes_classes_are_distinguishable():
    # A linear classifier on hand-made translation-invariant features must beat chance (10%) by far;
    # the proxy-FID classifier trained later on this set is much stronger than this.
    torch.manual_seed(0)
    n_train = 700
    ds = Shapes(1000, 32, seed=11)
    x, y = ds.batch(range(1000))
    f = _shift_invariant_features(x)
    mu, sd = f[:n_train].mean(0), f[:n_train].std(0) + 1e-6
    z = (f - mu) / sd
    w = torch.zeros(z.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=30, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z[:n_train] @ w + b, y[:n_train]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z[n_train:] @ w + b).argmax(1)
    acc = (pred == y[n_train:]).float().mean().item()
    per_class = [round((pred[y[n_train:] == c] == c).float().mean().item(), 2) for c in range(10)]
    print(f"held-out accuracy {acc:.3f} (chance 0.1), per class {per_class}")
    assert acc > 0.5, f"accuracy {acc:.3f}, per class {per_class}"


def test_shapes_bold_style_plain_backgrounds_larger_shapes_class_hue():
    tex, bold = Shapes(200, 32, seed=3), get_dataset("shapes-bold:32", n=200, seed=3)
    assert bold.style == "bold" and "style='bold'" in repr(bold) and tex.style == "textured"
    xt, yt = tex.batch(range(200))
    xb, yb = bold.batch(range(200))
    assert torch.equal(yt, yb) and xb.shape == xt.shape and xb.dtype == torch.float32
    assert xb.min() >= -1 and xb.max() <= 1

    def roughness(x):  # no grain or texture: neighbouring pixels differ much less
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()
    assert roughness(xb) < 0.6 * roughness(xt), (roughness(xb), roughness(xt))
    # The shape's hue follows the class: the pixels that differ most from the image's corner colour
    # (the shape) have a per-class mean colour, and classes 0 and 5 (hues 0 and 0.5) differ.
    corner = xb[:, :, :2, :2].mean((2, 3), keepdim=True)
    far = (xb - corner).norm(dim=1, keepdim=True)
    mask = (far >= far.flatten(1).quantile(0.8, dim=1).view(-1, 1, 1, 1)).float()
    fg = (xb * mask).sum((2, 3)) / mask.sum((2, 3))  # (N, 3) mean shape colour
    red = fg[:, 0] - fg[:, 1:].mean(1)
    assert red[yb == 0].mean() > red[yb == 5].mean() + 0.3
    # Deterministic and batching independent, like the textured style.
    assert torch.equal(bold.batch([5, 9])[0], xb[[5, 9]])
    with pytest.raises(ValueError, match="style"):
        Shapes(4, 32, style="glossy")
    with pytest.raises(ValueError, match="shapes-bold:<img_size>"):
        get_dataset("shapes-bold:big")


def _shape_masks(x):
    """Foreground masks [N, H, W]: pixels far from the image's corner colour (the background)."""
    corner = x[:, :, :2, :2].mean((2, 3), keepdim=True)
    far = (x - corner).norm(dim=1)
    return (far > 0.5 * far.flatten(1).amax(1).view(-1, 1, 1)).float()


def test_shapes_plain_style_pins_place_and_pose():
    bold, plain = get_dataset("shapes-bold", n=300, seed=4), get_dataset("shapes-plain:32", n=300, seed=4)
    assert plain.style == "plain" and "style='plain'" in repr(plain)
    xb, yb = bold.batch(range(300))
    xp, yp = plain.batch(range(300))
    assert torch.equal(yb, yp) and xp.min() >= -1 and xp.max() <= 1
    mb, mp = _shape_masks(xb), _shape_masks(xp)
    # Near the centre: shape centroids about a pixel from the image centre (bold's wander ~3 px; the
    # crescent's centroid sits off its centre by construction, hence the median).
    grid = torch.arange(32, dtype=torch.float32) - 15.5

    def centroid_dev(m):
        w = m.sum((1, 2))
        cx = (m * grid.view(1, 1, -1)).sum((1, 2)) / w
        cy = (m * grid.view(1, -1, 1)).sum((1, 2)) / w
        return torch.stack([cx, cy], 1).abs().amax(1)
    dp, db = centroid_dev(mp).median().item(), centroid_dev(mb).median().item()
    assert dp < 1.6 and db > 2.2, (dp, db)
    # Fixed pose: within a class the masks agree far more (pixelwise variance across items).
    var = lambda m, y: torch.stack([m[y == c].var(0).mean() for c in range(10)]).mean().item()  # noqa: E731
    assert var(mp, yp) < 0.75 * var(mb, yb), (var(mp, yp), var(mb, yb))  # measured 0.042 vs 0.069
    # Still bold colours: the hue follows the class, and still deterministic per item.
    assert torch.equal(plain.batch([7, 3])[0], xp[[7, 3]])
    with pytest.raises(ValueError, match="shapes-plain:<img_size>"):
        get_dataset("shapes-plain:x")


def test_proxy_classifier_recognises_plain_shapes():
    from duodiff_fast.eval import class_accuracy
    x, y = get_dataset("shapes-plain", n=600, seed=21).batch(range(600))
    assert class_accuracy(x, y, n_boot=10)["acc"] > 0.95


def test_proxy_classifier_recognises_bold_shapes_by_shape():
    from duodiff_fast.eval import class_accuracy
    x, y = get_dataset("shapes-bold", n=600, seed=21).batch(range(600))
    acc = class_accuracy(x, y, n_boot=10)
    assert acc["acc"] > 0.95, acc["per_class"]


def test_shapes_with_dataloader_batched_fetch():
    ds = Shapes(64, 16, seed=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    x, y = next(iter(loader))
    xr, yr = ds.batch(range(16))
    assert x.shape == (16, 3, 16, 16) and y.dtype == torch.int64
    assert torch.allclose(x, xr, atol=1e-6), _maxdiff(x, xr)
    assert torch.equal(y, yr)


# -----------------------------------------------------------------------------
# CIFAR-10
# -----------------------------------------------------------------------------

def _write_cifar(folder, n_per_batch=7, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [b"x.png"] * n_per_batch}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[name] = (data, labels)
    return out


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(folder)
    train = cifar10(str(folder))
    test = cifar10(str(folder), train=False)
    assert (len(train), len(test)) == (35, 7)
    assert (train.num_classes, train.img_size, train.channels) == (10, 32, 3)
    data3, labels3 = written["data_batch_3"]
    x, y = train[2 * 7 + 4]  # batch 3, row 4
    expect = torch.from_numpy(data3[4].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x, expect, atol=1e-6), _maxdiff(x, expect)
    assert y.dtype == torch.int64 and y.item() == labels3[4]
    xt, yt = test.batch(range(7))
    assert xt.shape == (7, 3, 32, 32) and yt.tolist() == written["test_batch"][1]
    # The parent folder and the tarball work too, with the same content.
    parent = cifar10(str(tmp_path))
    assert torch.equal(parent.data, train.data)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = get_dataset(f"cifar10:{tgz}", train=False)
    assert torch.equal(from_tar.data, test.data) and torch.equal(from_tar.labels(), test.labels())


def test_cifar10_errors_name_path_and_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        cifar10(str(missing))
    assert str(missing) in str(e.value) and "data_batch_1" in str(e.value)
    partial = tmp_path / "partial"
    _write_cifar(partial)
    os.remove(partial / "data_batch_4")
    with pytest.raises(FileNotFoundError) as e:
        cifar10(str(partial))
    assert str(partial) in str(e.value) and "data_batch_4" in str(e.value)
    bad_keys = tmp_path / "bad_keys"
    _write_cifar(bad_keys)
    with open(bad_keys / "test_batch", "wb") as f:
        pickle.dump({b"images": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError) as e:
        cifar10(str(bad_keys), train=False)
    assert str(bad_keys / "test_batch") in str(e.value) and "b'labels'" in str(e.value)
    garbage = tmp_path / "garbage"
    _write_cifar(garbage)
    (garbage / "test_batch").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="test_batch"):
        cifar10(str(garbage), train=False)
    wrong_shape = tmp_path / "wrong_shape"
    _write_cifar(wrong_shape)
    with open(wrong_shape / "test_batch", "wb") as f:
        pickle.dump({b"data": np.ones((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        cifar10(str(wrong_shape), train=False)


# -----------------------------------------------------------------------------
# Image folders
# -----------------------------------------------------------------------------

def _write_png(path, rgb, size=(40, 30)):
    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(path)


def test_image_folder_classes_and_pixels(tmp_path):
    colours = {"cat": (250, 10, 10), "dog": (10, 10, 250)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for k in range(3):
            _write_png(tmp_path / name / f"{k}.png", rgb)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = image_folder(str(tmp_path), img_size=16)
    assert (len(ds), ds.num_classes, ds.img_size, ds.channels) == (6, 2, 16, 3)
    assert ds.classes == ["cat", "dog"]
    x, y = ds.batch(range(6))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    for k, rgb in enumerate([colours["cat"]] * 3 + [colours["dog"]] * 3):
        expect = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
        assert torch.allclose(x[k], expect.expand(3, 16, 16), atol=2 / 255 + 1e-6), _maxdiff(x[k], expect)
    # Loose images: unconditional.
    loose = tmp_path / "loose"
    loose.mkdir()
    for k in range(2):
        _write_png(loose / f"{k}.jpg", (100, 150, 200), size=(20, 20))
    u = get_dataset(f"folder:{loose}", img_size=8)
    assert u.num_classes == 0 and u.labels().tolist() == [-1, -1] and u[1][0].shape == (3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        image_folder(str(tmp_path / "absent"), 32)
    assert str(tmp_path / "absent") in str(e.value) and "subfolder per class" in str(e.value)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        image_folder(str(empty), 32)
    assert str(empty) in str(e.value) and "no images" in str(e.value)
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "0.png").write_bytes(b"not a png at all")
    ds = image_folder(str(tmp_path / "broken"), 8)
    with pytest.raises(ValueError, match="0.png"):
        ds[0]


# -----------------------------------------------------------------------------
# .npz images and latents
# -----------------------------------------------------------------------------

def test_npz_uint8_nhwc_and_float_nchw(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(5, 12, 12, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    p = tmp_path / "u8.npz"
    np.savez(p, images=u8, labels=labels)
    ds = npz_images(str(p))
    assert (len(ds), ds.channels, ds.img_size, ds.num_classes) == (5, 3, 12, 6)
    x, y = ds[2]
    expect = torch.from_numpy(u8[2]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, expect, atol=1e-6), _maxdiff(x, expect)
    assert y.item() == 4
    # What the CLI writes: np.savez(path, arr_0=uint8 NHWC), no labels -> unconditional; and round trip.
    p0 = tmp_path / "samples.npz"
    np.savez(p0, to_uint8(ds.batch(range(5))[0]))
    d0 = get_dataset(f"npz:{p0}")
    assert d0.num_classes == 0 and d0[0][1].item() == -1
    assert torch.allclose(d0.batch(range(5))[0], ds.batch(range(5))[0], atol=1e-6)
    # Float NCHW in [-1, 1], grey images.
    fl = rng.uniform(-1, 1, size=(4, 1, 10, 10)).astype(np.float32)
    pf = tmp_path / "f.npz"
    np.savez(pf, images=fl)
    dsf = npz_images(str(pf))
    assert (dsf.channels, dsf.img_size) == (1, 10)
    assert torch.equal(dsf[3][0], torch.from_numpy(fl[3])), _maxdiff(dsf[3][0], torch.from_numpy(fl[3]))


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        npz_images(str(tmp_path / "missing.npz"))
    assert str(tmp_path / "missing.npz") in str(e.value)
    p = tmp_path / "wrongkey.npz"
    np.savez(p, pixels=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError) as e:
        npz_images(str(p))
    assert str(p) in str(e.value) and "pixels" in str(e.value) and "'images'" in str(e.value)
    p = tmp_path / "range.npz"
    np.savez(p, images=np.random.default_rng(0).uniform(0, 255, (2, 3, 8, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]") as e:
        npz_images(str(p))
    assert str(p) in str(e.value)
    p = tmp_path / "notnpz.npz"
    p.write_bytes(b"hello")
    with pytest.raises(ValueError) as e:
        npz_images(str(p))
    assert str(p) in str(e.value)
    p = tmp_path / "rect.npz"
    np.savez(p, images=np.zeros((2, 8, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="square"):
        npz_images(str(p))


def test_latent_features_npz_pt_and_uvit_folder(tmp_path):
    torch.manual_seed(0)
    z = torch.randn(6, 4, 8, 8)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    p = tmp_path / "feats.npz"
    np.savez(p, latents=z.numpy(), labels=labels.numpy(), scale_factor=np.float32(0.18215))
    ds = latent_features(str(p))
    assert (len(ds), ds.channels, ds.img_size, ds.num_classes) == (6, 4, 8, 3)
    assert ds.scale_factor == pytest.approx(0.18215)
    x, y = ds.batch([1, 4])
    assert torch.equal(x, z[[1, 4]]), _maxdiff(x, z[[1, 4]])  # latents come back as stored
    assert y.tolist() == [2, 0]
    pt = tmp_path / "feats.pt"
    torch.save({"latents": z.half()}, pt)
    dpt = get_dataset(f"latents:{pt}")
    assert dpt.num_classes == 0 and dpt.scale_factor is None
    assert torch.allclose(dpt[5][0], z[5], atol=2e-3), _maxdiff(dpt[5][0], z[5])
    # U-ViT feature folder: {i}.npy each holding a pickled (moments, label) pair.
    folder = tmp_path / "uvit"
    folder.mkdir()
    moments = np.random.default_rng(0).standard_normal((3, 8, 4, 4)).astype(np.float32)
    for i in range(3):
        np.save(folder / f"{i}.npy", np.array([moments[i], 7 - i], dtype=object), allow_pickle=True)
    dfold = get_dataset(str(folder))  # a bare path is recognised by its content
    assert (len(dfold), dfold.channels, dfold.img_size, dfold.num_classes) == (3, 8, 4, 8)
    x, y = dfold[1]
    assert torch.equal(x, torch.from_numpy(moments[1])) and y.item() == 6


def test_latent_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        latent_features(str(tmp_path / "none.npz"))
    assert str(tmp_path / "none.npz") in str(e.value) and "'latents'" in str(e.value)
    p = tmp_path / "nolatents.npz"
    np.savez(p, features=np.ones((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError) as e:
        latent_features(str(p))
    assert str(p) in str(e.value) and "features" in str(e.value)
    p = tmp_path / "flat.pt"
    torch.save({"latents": torch.randn(5, 16)}, p)
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]") as e:
        latent_features(str(p))
    assert str(p) in str(e.value)


# -----------------------------------------------------------------------------
# Specs and grids
# -----------------------------------------------------------------------------

def test_get_dataset_specs(tmp_path):
    ds = get_dataset("shapes")
    assert isinstance(ds, Shapes) and ds.img_size == 32 and len(ds) == 50_000
    ds = get_dataset("shapes:24", n=100, seed=5)
    assert (ds.img_size, len(ds), ds.seed) == (24, 100, 5)
    with pytest.raises(ValueError, match="shapes:<img_size>"):
        get_dataset("shapes:big")
    with pytest.raises(ValueError, match="cifar10:"):
        get_dataset("mnist:/nowhere")
    with pytest.raises(ValueError, match="npz:<path>"):
        get_dataset("npz:")
    folder = tmp_path / "c10"
    _write_cifar(folder, n_per_batch=2)
    assert len(get_dataset(f"cifar10:{folder}")) == 10
    assert len(get_dataset(str(folder), train=False)) == 2


def test_to_uint8_and_save_grid(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0, -7.0]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    u = to_uint8(x)
    assert u.shape == (1, 2, 3, 3) and u.dtype == np.uint8
    assert u[0, :, :, 0].ravel().tolist() == [0, 64, 128, 255, 255, 0]
    imgs = Shapes(10, 8, seed=0).batch(range(10))[0]
    path = tmp_path / "sub" / "grid.png"
    save_grid(imgs, str(path), nrow=4, padding=2)
    with Image.open(path) as im:
        assert im.size == (4 * (8 + 2) + 2, 3 * (8 + 2) + 2) and im.mode == "RGB"
        arr = np.asarray(im)
    ref = to_uint8(imgs)
    assert np.array_equal(arr[2:10, 2:10], ref[0])  # first image, after the padding
    assert np.array_equal(arr[12:20, 2 + 10:10 + 10], ref[5])  # row 1, column 1
    save_grid(imgs[:3, :1], str(tmp_path / "grey.png"))  # 1 channel: written as a grey image
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "L" and im.size == (2 * 10 + 2, 2 * 10 + 2)
    with pytest.raises(ValueError, match="save_grid"):
        save_grid(torch.zeros(2, 4, 8, 8), str(tmp_path / "latent.png"))

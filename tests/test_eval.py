"""Quality evaluation: fidelity, Frechet distance, KID, the shipped proxy classifier, the eval CLI."""
import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duodiff_fast.data import Shapes, to_uint8
from duodiff_fast.eval import (
    add_cli, fid_kid, fidelity, frechet_distance, inception_features, kernel_inception_distance,
    proxy_fid, proxy_kid,
)
from duodiff_fast.proxy import ProxyClassifier

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
METHODS = ["eigh"] + (["sqrtm"] if HAS_SCIPY else [])


def _close(name, got, want, rtol=1e-9, atol=1e-9):
    err = abs(got - want)
    print(f"{name}: got {got!r} want {want!r} abs err {err:.3g}")
    assert err <= atol + rtol * abs(want), f"{name}: got {got}, want {want} (abs err {err:.3g})"


# -----------------------------------------------------------------------------
# fidelity
# -----------------------------------------------------------------------------

def test_fidelity_matches_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 7, generator=g) * 1.6 - 0.8
    b = a + torch.tensor([0.1, -0.2]).view(2, 1, 1, 1)  # per-image constant errors 0.1 and 0.2
    r = fidelity(a, b)
    np.testing.assert_allclose(r["mse_per_image"], [0.01, 0.04], rtol=1e-6)
    np.testing.assert_allclose(r["psnr_per_image"], [10 * math.log10(400), 20.0], rtol=1e-6)
    _close("mse", r["mse"], 0.025, rtol=1e-6)
    _close("psnr (of the mean mse)", r["psnr"], 10 * math.log10(160), rtol=1e-6)
    _close("psnr_mean", r["psnr_mean"], (10 * math.log10(400) + 20.0) / 2, rtol=1e-6)
    assert r["n"] == 2


def test_fidelity_on_uint8_npz_one_level_apart(tmp_path):
    rng = np.random.default_rng(1)
    u = rng.integers(0, 255, size=(3, 8, 8, 3), dtype=np.uint8)  # 0..254 so +1 stays in range
    np.savez(tmp_path / "a.npz", arr_0=u, labels=np.array([1, 2, 3]))
    np.savez(tmp_path / "b.npz", arr_0=u + 1, labels=np.array([1, 2, 3]))
    r = fidelity(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    # one uint8 level is 2/255 on the [-1, 1] scale -> PSNR = 20 log10(255)
    _close("mse", r["mse"], (2 / 255) ** 2, rtol=1e-5)
    _close("psnr", r["psnr"], 20 * math.log10(255), rtol=1e-6)
    same = fidelity(u, u)
    assert same["mse"] == 0 and math.isinf(same["psnr"])
    np.savez(tmp_path / "c.npz", arr_0=u, labels=np.array([1, 2, 4]))
    with pytest.raises(ValueError, match="labels"):
        fidelity(str(tmp_path / "a.npz"), str(tmp_path / "c.npz"))
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(u, u[:2])


# -----------------------------------------------------------------------------
# Frechet distance and KID
# -----------------------------------------------------------------------------

def _random_cov(d, seed):
    g = np.random.default_rng(seed)
    a = g.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identical_and_shifted_equal_covariance(method):
    d = 17
    g = np.random.default_rng(2)
    mu, s = g.standard_normal(d), _random_cov(d, 3)
    fd0 = frechet_distance(mu, s, mu, s, method=method)
    print(f"{method}: identical stats -> {fd0:.3g}")
    assert abs(fd0) < 1e-8
    shift = g.standard_normal(d)
    _close(f"{method} shifted", frechet_distance(mu, s, mu + shift, s, method=method), float(shift @ shift),
           rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_diagonal_closed_form(method):
    g = np.random.default_rng(4)
    d = 9
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    v1, v2 = g.uniform(0.2, 3.0, d), g.uniform(0.2, 3.0, d)
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    _close(f"{method} diagonal", frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method), want,
           rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed")
def test_frechet_sqrtm_and_eigh_agree_on_full_covariances():
    g = np.random.default_rng(5)
    d = 32
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    s1, s2 = _random_cov(d, 6), _random_cov(d, 7)
    a = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    b = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    _close("sqrtm vs eigh", a, b, rtol=1e-9, atol=1e-9)


def test_kid_near_zero_for_same_distribution_and_larger_for_different():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(600, 32, generator=g)
    y = torch.randn(600, 32, generator=g)
    z = torch.randn(600, 32, generator=g) * 1.3 + 0.3
    same, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=300)
    diff, diff_std = kernel_inception_distance(x, z, subsets=20, subset_size=300)
    print(f"KID same {same:.4g} +- {same_std:.2g}, different {diff:.4g} +- {diff_std:.2g}")
    assert abs(same) < 0.02 and abs(same) < 3 * same_std + 1e-3
    assert diff > 0.2 and diff > 20 * abs(same)


# -----------------------------------------------------------------------------
# proxy classifier and proxy FID
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clf():
    return ProxyClassifier.load()


@pytest.fixture(scope="module")
def shapes_pair():
    a, _ = Shapes(400, 32, seed=777).batch(range(400))
    b, _ = Shapes(400, 32, seed=778).batch(range(400))
    return a, b


def test_proxy_classifier_loads_offline_and_classifies_fresh_shapes(clf):
    assert clf.meta["dataset"].startswith("shapes") and int(clf.meta["feature_dim"]) == clf.feature_dim
    ds = Shapes(500, 32, seed=31337)
    x, y = ds.batch(range(500))
    acc = float((clf.predict(x) == y).float().mean())
    # the same images as uint8 NHWC (the samples.npz layout) and at 64x64 (resized to 32)
    acc_u8 = float((clf.predict(to_uint8(x)) == y).float().mean())
    x64, y64 = Shapes(200, 64, seed=31337).batch(range(200))
    acc64 = float((clf.predict(x64) == y64).float().mean())
    print(f"accuracy {acc:.3f} (uint8 {acc_u8:.3f}, 64x64 {acc64:.3f}); shipped metadata "
          f"{clf.meta.get('test_accuracy')}")
    assert acc > 0.8 and acc_u8 > 0.8 and acc64 > 0.7
    assert clf.features(x[:7]).shape == (7, clf.feature_dim)


def test_proxy_fid_separates_same_distribution_from_degraded(clf, shapes_pair):
    a, b = shapes_pair
    g = torch.Generator().manual_seed(8)
    noise = torch.rand(b.shape, generator=g) * 2 - 1
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :] / 256).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(b, (2, 2, 2, 2), mode="reflect"), k, groups=3)
    shifted = (b + torch.tensor([0.35, -0.2, -0.35]).view(1, 3, 1, 1)).clamp(-1, 1)
    fid = {name: proxy_fid(a, ref, classifier=clf)
           for name, ref in [("other seed", b), ("noise", noise), ("blur", blurred),
                             ("colour shift", shifted)]}
    print("proxy FID vs Shapes(seed 777):", {k: round(v, 3) for k, v in fid.items()})
    # observed with the shipped weights: other seed ~0.7, colour shift ~4.5, blur ~22, noise > 1000
    for name, factor in (("noise", 10), ("blur", 10), ("colour shift", 3)):
        assert fid[name] > factor * fid["other seed"], \
            f"{name}: {fid[name]:.3f}, not {factor}x the same-distribution value {fid['other seed']:.3f}"


def test_proxy_kid_and_reference_spec_with_cache(clf, shapes_pair, tmp_path):
    a, _ = shapes_pair
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1
    same, _ = proxy_kid(a, "shapes", reference_n=400, classifier=clf, cache_dir=str(tmp_path), subsets=10,
                        subset_size=200)
    assert len(list(tmp_path.glob("ref_features_*.npz"))) == 1  # the held-out reference was cached
    other, _ = proxy_kid(noise, "shapes", reference_n=400, classifier=clf, cache_dir=str(tmp_path),
                         subsets=10, subset_size=200)
    print(f"proxy KID: shapes {same:.4g}, noise {other:.4g}")
    assert other > 10 * abs(same)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------

def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="duodiff-fast")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_cli_on_npz_files(tmp_path, capsys):
    x, y = Shapes(120, 32, seed=55).batch(range(120))
    g = torch.Generator().manual_seed(10)
    deep = to_uint8(x)
    duo = to_uint8((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    (tmp_path / "deep").mkdir()
    (tmp_path / "duo").mkdir()
    np.savez(tmp_path / "deep" / "samples.npz", arr_0=deep, labels=y.numpy())
    np.savez(tmp_path / "duo" / "samples.npz", arr_0=duo, labels=y.numpy())
    (tmp_path / "duo" / "samples.json").write_text(json.dumps(dict(switch="0.3", shallow_steps=15, steps=50)))
    out = tmp_path / "res.json"
    duo_npz, deep_npz = str(tmp_path / "duo" / "samples.npz"), str(tmp_path / "deep" / "samples.npz")
    rc = _run_cli(["eval", "--samples", duo_npz, deep_npz, "--reference", deep_npz, "--out", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0 and "psnr" in printed and "proxy_fid" in printed
    res = json.loads(out.read_text())
    duo_row, deep_row = res["rows"]
    assert duo_row["shallow_steps"] == 15 and duo_row["n"] == 120
    assert 20 < duo_row["psnr"] < 40 and duo_row["mse"] > 0  # noise std 0.05 -> about 32 dB
    assert deep_row["mse"] == 0 and deep_row["proxy_fid"] < 1e-6 < duo_row["proxy_fid"]
    assert "proxy_kid" in duo_row and res["proxy_classifier"]["dataset"].startswith("shapes")


def test_eval_cli_rejects_fidelity_without_reference(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.full((4, 8, 8, 3), 7, np.uint8))
    with pytest.raises(ValueError, match="--reference"):
        _run_cli(["eval", "--samples", str(tmp_path / "s.npz"), "--metrics", "fidelity"])


# -----------------------------------------------------------------------------
# real FID / KID: Inception weights from a local file only
# -----------------------------------------------------------------------------

def test_missing_inception_weights_error_names_the_path(tmp_path):
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError) as e:
        fid_kid(x, x, inception_weights=str(missing))
    assert str(missing) in str(e.value) and "https://" in str(e.value)
    with pytest.raises(FileNotFoundError, match="none was given"):
        fid_kid(x, x, inception_weights=None)
    np.savez(tmp_path / "s.npz", arr_0=np.full((4, 8, 8, 3), 7, np.uint8))
    with pytest.raises(FileNotFoundError, match="not found"):
        _run_cli(["eval", "--samples", str(tmp_path / "s.npz"), "--reference-data", "shapes",
                  "--metrics", "fid", "--inception-weights", str(missing)])


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed")
def test_inception_features_run_offline_from_a_local_file(tmp_path, monkeypatch):
    """Plumbing only (random weights): the extractor imports without torchvision and reads the file."""
    from duodiff_fast.eval import _inception_class

    cls = _inception_class()
    dummy = tmp_path / "empty.pth"
    torch.save({}, dummy)
    with monkeypatch.context() as m:  # build the architecture once with random weights, then save it
        m.setattr(cls, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(dummy))
    weights = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), weights)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
    f = inception_features(x, str(weights), device="cpu")
    print(f"features {tuple(f.shape)}, mean {f.mean():.4g}")
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and not torch.equal(f[0], f[1])


# -----------------------------------------------------------------------------
# class accuracy and bootstrap intervals
# -----------------------------------------------------------------------------

def test_class_accuracy_is_high_on_real_shapes_and_chance_on_shuffled_labels():
    from duodiff_fast.eval import class_accuracy
    x, y = Shapes(300, 32, seed=77).batch(range(300))
    right = class_accuracy(x, y, n_boot=200)
    print(right["acc"], right["low"], right["high"])
    assert right["acc"] > 0.9 and right["low"] <= right["acc"] <= right["high"]
    wrong = class_accuracy(x, (y + 1) % 10, n_boot=200)
    assert wrong["acc"] < 0.2
    assert right["high"] < 1.0 + 1e-9 and wrong["low"] >= 0.0
    with pytest.raises(ValueError, match="labels must be in"):
        class_accuracy(x, y + 10)
    with pytest.raises(ValueError, match="300 images but 299 labels"):
        class_accuracy(x, y[:299])


def test_bootstrap_interval_narrows_with_more_samples_and_covers_the_mean():
    from duodiff_fast.eval import bootstrap_interval
    rng = np.random.RandomState(0)
    small, large = rng.rand(50), rng.rand(2000)
    ls, hs = bootstrap_interval(lambda i: float(small[i.numpy()].mean()), 50, 500)
    ll, hl = bootstrap_interval(lambda i: float(large[i.numpy()].mean()), 2000, 500)
    assert ls <= small.mean() <= hs and ll <= large.mean() <= hl
    assert (hl - ll) < (hs - ls) / 3


def test_paired_fid_difference_tells_degraded_from_same(tmp_path):
    from duodiff_fast.eval import feature_statistics, paired_fid_difference
    clf = ProxyClassifier.load()
    ref = clf.features(Shapes(600, 32, seed=5).batch(range(600))[0])
    mu, sigma = feature_statistics(ref)
    a = clf.features(Shapes(150, 32, seed=6).batch(range(150))[0])
    noisy = clf.features((Shapes(150, 32, seed=6).batch(range(150))[0] + 0.6 * torch.randn(150, 3, 32, 32)).clamp(-1, 1))
    d = paired_fid_difference(noisy, a, mu, sigma, n_boot=60)
    assert d["diff"] > 0 and d["low"] > 0  # the degraded set is worse, and the interval says so
    same = paired_fid_difference(a, a, mu, sigma, n_boot=20)
    assert same["diff"] == 0 and same["low"] == same["high"] == 0


def test_paired_accuracy_difference_cancels_shared_noise():
    from duodiff_fast.eval import paired_accuracy_difference
    g = torch.Generator().manual_seed(3)
    y = torch.arange(400) % 10
    b = torch.where(torch.rand(400, generator=g) < 0.7, y, (y + 1) % 10)  # ~70% right
    # a: b with 20 of b's wrong answers fixed, so a is exactly 5 points better, sample by sample
    a = b.clone()
    fix = torch.nonzero(b != y).reshape(-1)[:20]
    a[fix] = y[fix]
    d = paired_accuracy_difference(a, b, y, n_boot=400)
    assert d["diff"] == pytest.approx(0.05) and d["n"] == 400
    assert 0 < d["low"] <= d["diff"] <= d["high"]  # a paired interval sees a consistent 5-point gain
    # the unpaired intervals of the two accuracies overlap: only the paired one tells them apart
    from duodiff_fast.eval import bootstrap_interval
    ca, cb = (a == y).double(), (b == y).double()
    _, hb = bootstrap_interval(lambda i: float(cb[i].mean()), 400, 400)
    la, _ = bootstrap_interval(lambda i: float(ca[i].mean()), 400, 400)
    assert la < hb
    same = paired_accuracy_difference(b, b, y, n_boot=50)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    flipped = paired_accuracy_difference(b, a, y, n_boot=400)
    assert flipped["diff"] == pytest.approx(-0.05) and flipped["high"] < 0
    with pytest.raises(ValueError, match="paired sample by sample"):
        paired_accuracy_difference(a[:399], b, y)
    with pytest.raises(ValueError, match="no samples"):
        paired_accuracy_difference(a[:0], b[:0], y[:0])


def test_eval_cli_class_acc(tmp_path, capsys):
    x, y = Shapes(120, 32, seed=55).batch(range(120))
    u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "s.npz", arr_0=u8, labels=y.numpy())
    out = tmp_path / "r.json"
    _run_cli(["eval", "--samples", str(tmp_path / "s.npz"), "--metrics", "class_acc", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["class_acc"] > 0.9 and row["class_acc_low"] <= row["class_acc"] <= row["class_acc_high"]
    np.savez(tmp_path / "nolabels.npz", arr_0=u8)
    with pytest.raises(ValueError, match="no 'labels'"):
        _run_cli(["eval", "--samples", str(tmp_path / "nolabels.npz"), "--metrics", "class_acc"])


# -----------------------------------------------------------------------------
# Denoiser probes
# -----------------------------------------------------------------------------

class _Probe(torch.nn.Module):
    """A stand-in denoiser with the attributes the probes read; `fn(x, y)` is its eps prediction."""

    def __init__(self, fn, img_size=16, patch_size=4, num_classes=11):
        super().__init__()
        self.fn, self.w = fn, torch.nn.Parameter(torch.zeros(()))
        self.img_size, self.in_channels, self.patch_size = img_size, 3, patch_size
        self.num_classes, self.null_class = num_classes, num_classes - 1
        self.schedule_spec, self.time_convention = {"name": "linear"}, "int"

    def forward(self, x, t, y=None):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return self.fn(x, y)


def _per_patch_unit(x, p=4):
    n, C, S, _ = x.shape
    z = x.unfold(2, p, p).unfold(3, p, p)  # (n, C, h, w, p, p)
    norm = z.square().sum((1, 4, 5), keepdim=True).sqrt()
    z = z / norm * (C * p * p) ** 0.5
    return z.permute(0, 1, 2, 4, 3, 5).reshape(n, C, S, S)


def test_passthrough_probe_tells_a_perfect_pass_through_from_a_per_patch_normalised_one():
    from duodiff_fast.eval import passthrough_probe
    ideal = passthrough_probe(_Probe(lambda x, y: x))
    assert ideal["mse"] < 1e-12 and ideal["gain_std"] < 1e-6 and ideal["cosine"] > 0.9999
    flat = passthrough_probe(_Probe(lambda x, y: _per_patch_unit(x)), n=128)
    # Right directions, every patch at the same norm: the U-ViT failure the probe was written for.
    assert flat["cosine"] > 0.9999 and flat["gain_norm_corr"] < -0.9
    assert 0.05 < flat["gain_std"] < 0.15 and 0.005 < flat["mse"] < 0.02, flat


def test_label_probe_measures_how_much_the_label_moves_eps():
    from duodiff_fast.eval import label_probe
    blind = label_probe(_Probe(lambda x, y: x, img_size=32), "shapes-bold", n=40, ts=(200, 800))
    assert [r["t"] for r in blind] == [200, 800]
    for r in blind:
        assert r["label_effect"] == 0 and r["mse_right"] == r["mse_wrong"] == r["mse_null"] > 0
    reads = label_probe(_Probe(lambda x, y: x * (1 + 0.1 * (y == 10).float().view(-1, 1, 1, 1)), img_size=32),
                        "shapes-bold", n=40, ts=(500,))
    assert reads[0]["label_effect"] == pytest.approx(0.1 / 1.0, rel=1e-4)
    with pytest.raises(ValueError, match="class-conditional"):
        label_probe(_Probe(lambda x, y: x, num_classes=0), "shapes", n=4)


def test_reference_images_of_shapes_styles_are_held_out():
    from duodiff_fast.data import Shapes
    from duodiff_fast.eval import SHAPES_REFERENCE_SEED, reference_images
    for spec, style in (("shapes", "textured"), ("shapes-bold", "bold")):
        ref = reference_images(spec, n=8)
        held_out = Shapes(8, 32, seed=SHAPES_REFERENCE_SEED, style=style).batch(range(8))[0]
        train = Shapes(8, 32, seed=0, style=style).batch(range(8))[0]
        assert torch.equal(ref, held_out) and not torch.equal(ref, train)

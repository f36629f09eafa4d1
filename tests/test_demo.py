"""The demo: shipped weights load offline, and the demo runs end to end (small settings)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from duodiff_fast.demo import ASSETS, DEMO_FILES, load_demo_model, load_demo_pair, run_demo


def test_shipped_pair_fits_the_budget_and_loads():
    files = list(DEMO_FILES.values()) + [f"demo_exits_{v}.safetensors" for v in ("adadiff", "duodiff")]
    total = sum(os.path.getsize(ASSETS / f) for f in files)  # the pair and its exit heads: one budget
    assert total <= 10 * 2**20, f"demo weights are {total / 2**20:.2f} MiB"
    shallow, deep = load_demo_pair()
    assert (shallow.depth_blocks, deep.depth_blocks) == (3, 13)
    assert (shallow.img_size, shallow.in_channels) == (deep.img_size, deep.in_channels) == (32, 3)
    assert deep.time_convention == shallow.time_convention == "int" and deep.schedule_spec["name"] == "linear"
    assert deep.training_data == shallow.training_data == "shapes-plain" and deep.pos_embed_std == 1.0
    assert deep.trained_steps > 0 and shallow.trained_steps > 0
    assert next(deep.parameters()).dtype == torch.float32


def test_shipped_exit_heads_belong_to_the_shipped_deep_model():
    import warnings

    from duodiff_fast.train_exits import load_exit_model
    _, deep = load_demo_pair()
    for v in ("adadiff", "duodiff"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # heads fitted to other weights would warn
            m = load_exit_model(deep, ASSETS / f"demo_exits_{v}.safetensors")
        assert m.variant == v and m.exits == list(range(1, 13))


def test_shipped_deep_model_draws_its_classes():
    """A guard against shipping a broken pair: 20 deep-only samples (two per class, 10 DDIM steps,
    guidance 3) are mostly read as their classes by the proxy classifier, far above chance (10%).
    Measured on the shipped pair: 19 of 20."""
    from duodiff_fast.eval import class_accuracy
    from duodiff_fast.sampling import DuoSampler
    shallow, deep = load_demo_pair()
    smp = DuoSampler(shallow, deep, schedule=deep.schedule_spec, solver="ddim", steps=10, switch=0.0,
                     cfg_scale=3.0, clip_sample=1.0)
    y = torch.arange(20) % 10
    x = smp.sample(noise=torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), y=y)
    acc = class_accuracy(x.clamp(-1, 1), y, n_boot=10)["acc"]
    assert acc >= 0.7, acc


def test_missing_or_foreign_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_demo_model(tmp_path / "nothing.safetensors")
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(path))
    with pytest.raises(ValueError, match="no 'spec'"):
        load_demo_model(path)


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rows = run_demo(out=str(out), n=8, steps=6, switches=(0.5,), reference_n=64, batch_size=8, progress=False,
                    n_boot=100, n_boot_fid=20)
    assert [r["mode"] for r in rows] == ["deep-only", "DuoDiff 0.5", "shallow-only"]
    assert [r["shallow_steps"] for r in rows] == [0, 3, 6]
    assert rows[0]["theoretical_speedup"] == pytest.approx(1.0)
    assert rows[1]["theoretical_speedup"] == pytest.approx(13 * 6 / (3 * 3 + 13 * 3))
    assert rows[2]["theoretical_speedup"] == pytest.approx(13 / 3)
    for r in rows:
        assert r["seconds_per_image"] > 0 and r["proxy_fid"] > 0
        assert 0.0 <= r["class_acc_low"] <= r["class_acc"] <= r["class_acc_high"] <= 1.0
        assert r["proxy_fid_low"] <= r["proxy_fid_high"]
    assert "fid_diff_vs_deep" not in rows[0] and rows[1]["fid_diff_low"] <= rows[1]["fid_diff_high"]
    assert "class_acc_diff_vs_deep" not in rows[0]
    for r in rows[1:]:  # the paired accuracy difference is the two rows' accuracies apart, inside its interval
        assert r["class_acc_diff_vs_deep"] == pytest.approx(r["class_acc"] - rows[0]["class_acc"])
        assert r["class_acc_diff_low"] <= r["class_acc_diff_vs_deep"] <= r["class_acc_diff_high"]
    # n=8 asks for classes 0..7 once each: per-class accuracy is 0 or 1 there, None (not NaN) for 8 and 9
    for r in rows:
        pc = r["class_acc_per_class"]
        assert len(pc) == 10 and pc[8] is None and pc[9] is None and all(p in (0.0, 1.0) for p in pc[:8])
        assert sum(pc[:8]) / 8 == pytest.approx(r["class_acc"])
    # the deep segment pulls DuoDiff's samples towards deep-only: closer than shallow-only ones
    assert rows[1]["psnr_vs_deep"] > rows[2]["psnr_vs_deep"]
    for name in ("side_by_side.png", "speed_quality.png", "results.json", "results.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][1]["shallow_steps"] == 3
    from duodiff_fast.demo import DEMO_CFG_SCALE, DEMO_SHALLOW_CFG_SCALE
    assert saved["cfg_scale"] == DEMO_CFG_SCALE
    want = DEMO_CFG_SCALE if DEMO_SHALLOW_CFG_SCALE is None else DEMO_SHALLOW_CFG_SCALE
    assert saved["shallow_cfg_scale"] == want
    table = (out / "results.md").read_text()
    assert "accuracy - deep (points)" in table and f"{100 * rows[1]['class_acc_diff_vs_deep']:+.1f} [" in table

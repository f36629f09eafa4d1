"""Early-exit baseline: heads compose the model's public pieces, training with a frozen backbone (resume,
refusal of an occupied folder), strict loading, the threshold rule at its edges, batch vs per-sample
agreement, really skipped blocks, the phase-transition profile and switch calibration."""
import json

import pytest
import torch

from duodiff_fast.models import create_model, save_safetensors
from duodiff_fast.models.exits import EXIT_RULES, EarlyExitModel, passes
from duodiff_fast.sampling.early_exit import (EarlyExitSampler, calibrate_switch, profile_exits,
                                              suggest_switch_from_profile)
from duodiff_fast.train_exits import ExitTrainConfig, load_exit_model, train_exits

SPEC = {"family": "uvit", "kwargs": dict(img_size=8, patch_size=2, embed_dim=32, depth=5, num_heads=2,
                                         num_classes=11), "time_convention": "frac1000",
        "schedule": {"name": "linear"}}
DIT = {"family": "dit", "kwargs": dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4,
                                       num_heads=2, num_classes=10, learn_sigma=False),
       "time_convention": "int", "schedule": {"name": "linear"}}


def backbone(spec=SPEC, depth=None, seed=0):
    torch.manual_seed(seed)
    s = json.loads(json.dumps(spec))
    if depth is not None:
        s["kwargs"]["depth"] = depth
    m = create_model(s).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("spec", [SPEC, DIT], ids=["uvit", "dit"])
@pytest.mark.parametrize("variant", ["duodiff", "adadiff"])
def test_model_composes_the_backbone_and_freezes_it(spec, variant):
    bb = backbone(spec)
    m = EarlyExitModel(bb, variant)
    assert m.exits == list(range(1, bb.num_blocks))
    assert not any(p.requires_grad for p in m.backbone.parameters())
    x = torch.randn(2, bb.in_channels, 8, 8)
    t, y = torch.tensor([0.3, 0.7]) * (1000 if spec is DIT else 1), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(m(x, t, y), bb(x, t, y))  # the wrapper samples like its backbone
        streams, final = m.all_exits(x, t, y)
        for i in m.exits:
            assert m.exit_output(i, streams[i]).shape == (2, bb.in_channels, 8, 8)
            s = m.score(i, streams[i])
            assert s.shape == (2,) and ((s >= 0) & (s <= 1)).all()
    eps = torch.randn_like(x)
    res = m.exit_losses(x, t, y, eps)
    res["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_threshold_rule_is_stated_once_and_holds_at_its_edges():
    s = torch.tensor([0.049, 0.05, 0.051])
    assert passes("duodiff", s, 0.05).tolist() == [True, True, False]  # uncertainty at or below
    c = torch.tensor([0.899, 0.9, 0.901])
    assert passes("adadiff", c, 0.9).tolist() == [False, True, True]  # confidence at or above
    assert "<=" in EXIT_RULES["duodiff"] and ">=" in EXIT_RULES["adadiff"]
    with pytest.raises(ValueError, match="variant"):
        passes("deediff", s, 0.1)


def _sampler(m, thr, mode, **kw):
    return EarlyExitSampler(m, thr, mode=mode, steps=6, **kw)


@pytest.mark.parametrize("variant", ["duodiff", "adadiff"])
def test_threshold_extremes_exit_at_the_first_exit_or_never(variant):
    m = EarlyExitModel(backbone(), variant)
    always, never = (1.0, 0.0) if variant == "duodiff" else (0.0, 1.0 + 0.0)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    a = _sampler(m, always, "batch")
    a.sample(noise=noise, y=y)
    assert (a.trace.exits == 1).all()
    # duodiff: u <= 0 needs a zero sigmoid; adadiff: c >= 1 a saturated one: neither happens here
    n = _sampler(m, never, "batch")
    n.sample(noise=noise, y=y)
    assert (n.trace.exits == m.num_blocks).all()
    # Never exiting is exactly full-depth sampling with the backbone.
    from duodiff_fast.sampling import DuoSampler
    want = DuoSampler(m.backbone, m.backbone, steps=6, switch=0).sample(noise=noise, y=y)
    got = n.sample(noise=noise, y=y)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("variant", ["duodiff", "adadiff"])
def test_batch_and_per_sample_agree_for_a_batch_of_one(variant):
    m = EarlyExitModel(backbone(), variant)
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 8)
        streams, _ = m.all_exits(x, torch.tensor([0.5]), torch.tensor([1]))
        scores = sorted(float(m.score(i, streams[i])) for i in m.exits)
    thr = scores[len(scores) // 2]  # a threshold that some exits pass and some do not
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([4])
    b, p = _sampler(m, thr, "batch"), _sampler(m, thr, "per_sample")
    xb, xp = b.sample(noise=noise, y=y), p.sample(noise=noise, y=y)
    assert torch.equal(b.trace.exits, p.trace.exits)
    assert torch.allclose(xb, xp, atol=1e-6)


def test_batch_mode_really_skips_blocks():
    m = EarlyExitModel(backbone(), "duodiff")
    calls = []
    for blk in [m.backbone.block(i) for i in range(m.num_blocks)]:
        blk.register_forward_pre_hook(lambda mod, args: calls.append(1))
        blk.attn.register_forward_pre_hook(lambda mod, args: calls.append("attn"))
    _sampler(m, 1.0, "batch").sample(n=2, y=torch.tensor([1, 2]))  # u <= 1 always: exit after 1 block
    assert calls.count("attn") == 6  # one block per step, 6 steps
    calls.clear()
    s = _sampler(m, 0.0, "per_sample")
    s.sample(n=2, y=torch.tensor([1, 2]))
    assert calls.count("attn") == 6 * m.num_blocks


def test_bad_inputs():
    m = EarlyExitModel(backbone(), "duodiff")
    for bad, text in ((dict(threshold=1.5), "threshold"), (dict(threshold=float("nan")), "threshold"),
                      (dict(mode="each"), "mode"), (dict(switch=0.3), "switch"), (dict(cuda_graphs=True), "cuda_graphs")):
        kw = dict(threshold=0.1, mode="batch")
        kw.update(bad)
        with pytest.raises(ValueError, match=text):
            EarlyExitSampler(m, steps=4, **kw)
    with pytest.raises(TypeError, match="U-ViT or a DiT"):
        EarlyExitModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="variant"):
        EarlyExitModel(backbone(), "deediff")
    with pytest.raises(ValueError, match="EarlyExitModel"):
        EarlyExitSampler(backbone(), 0.1)


def test_train_exits_resume_refusal_and_strict_loading(tmp_path):
    bb = backbone()
    ckpt = tmp_path / "deep.safetensors"
    save_safetensors(bb, ckpt)
    spec = tmp_path / "deep.json"
    spec.write_text(json.dumps(SPEC))
    base = dict(backbone=str(spec), backbone_ckpt=str(ckpt), data="shapes:8", data_kwargs={"n": 64}, steps=6,
                batch_size=8, ckpt_every=2, log_every=1, progress=False, seed=3)
    full = train_exits(ExitTrainConfig(out=str(tmp_path / "a"), **base))
    train_exits(ExitTrainConfig(out=str(tmp_path / "b"), stop_at=4, **base))
    resumed = train_exits(ExitTrainConfig(out=str(tmp_path / "b"), resume="latest", **base))
    a = load_exit_model(bb, full["export"]).exit_state_dict()
    b = load_exit_model(bb, resumed["export"]).exit_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    with pytest.raises(FileExistsError, match="--resume"):
        train_exits(ExitTrainConfig(out=str(tmp_path / "a"), **base))
    other = backbone(depth=3)
    with pytest.raises(ValueError, match="do not match"):
        load_exit_model(other, full["export"])
    with pytest.raises(ValueError, match="not a readable"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x00" * 20)
        load_exit_model(bb, bad)


def test_profile_writes_json_and_plot_and_suggests_a_switch(tmp_path):
    m = EarlyExitModel(backbone(), "duodiff")
    res = profile_exits(m, thresholds=(0.3, 0.6), n=4, steps=5, out=str(tmp_path))
    data = json.loads((tmp_path / "exits.json").read_text())
    for key in ("timesteps", "mean_exit", "std_exit", "depth", "threshold"):
        assert key in data
    assert len(data["mean_exit"]) == len(data["timesteps"]) == len(data["threshold"]) == 5
    assert data["depth"] == m.num_blocks and len(data["profiles"]) == 2
    assert data["timesteps"][0] > data["timesteps"][-1]  # sampling order: noisiest first
    assert (tmp_path / "exits.png").stat().st_size > 1000
    fake = {"profiles": [{"mean_exit": [1, 2, 3, 4, 5, 5]}]}
    assert suggest_switch_from_profile(fake, 3) == pytest.approx(3 / 6)
    assert 0.0 <= suggest_switch_from_profile(res, 3) <= 1.0


def test_calibrate_switch_picks_the_largest_share_within_tolerance(tmp_path):
    deep, shallow = backbone(depth=5, seed=0), backbone(depth=3, seed=0)
    res = calibrate_switch(shallow, deep, switches=[0.2, 0.5, 1.0], n=3, steps=6, tolerance_db=0.0,
                           out=str(tmp_path))
    assert res["chosen_switch"] == 1.0  # any PSNR >= 0 dB passes: the largest share
    strict = calibrate_switch(shallow, deep, switches=[0.2, 0.5, 1.0], n=3, steps=6, tolerance_db=1e9)
    assert strict["chosen_switch"] == 0.0  # nothing passes: deep only
    rows = {r["switch"]: r for r in res["rows"]}
    assert rows[0.0]["psnr_vs_deep"] == float("inf") and rows[1.0]["theoretical_speedup"] > 1.0
    assert (tmp_path / "calibrate.json").is_file() and (tmp_path / "calibrate.png").is_file()

"""Early exit beyond the basics: per-sample gathering in mixed batches, DiT backbones, bad inputs of the
profile and the calibration, strict and honest head loading (variant, extra tensors, another backbone's
heads), resume refusals, and the three CLIs (train-exits, profile, calibrate) end to end."""
import json

import pytest
import torch

from duodiff_fast.cli import main
from duodiff_fast.models import save_safetensors
from duodiff_fast.models.exits import EarlyExitModel
from duodiff_fast.sampling.early_exit import (DEFAULT_THRESHOLDS, DEFAULT_TOLERANCE_DB, EarlyExitSampler,
                                              calibrate_switch, profile_exits)
from duodiff_fast.train_exits import ExitTrainConfig, backbone_fingerprint, load_exit_model, train_exits

from .test_exits import DIT, SPEC, backbone


def _scores(m, x, t, y):
    with torch.no_grad():
        streams, _ = m.all_exits(x, t, y)
        return torch.stack([m.score(i, streams[i]) for i in m.exits], 1)  # [B, exits]


@pytest.mark.parametrize("spec", [SPEC, DIT], ids=["uvit", "dit"])
def test_per_sample_mode_gathers_each_sample_from_its_own_exit(spec):
    """A batch whose samples exit at different layers gives each sample what it gets alone."""
    m = EarlyExitModel(backbone(spec), "duodiff")
    noise = torch.randn(3, m.backbone.in_channels, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 4, 7])
    t0 = torch.full((3,), 999.0 if spec is DIT else 0.999)
    first = _scores(m, noise, t0, y)[:, 0].sort().values  # exit-1 scores at the first step
    # Half-way between the lowest two: one sample leaves at exit 1, the others go deeper (a margin, so
    # batch-size rounding cannot flip a decision).
    thr = float(first[0] + first[1]) / 2
    alone = [EarlyExitSampler(m, thr, mode="per_sample", steps=5) for _ in range(3)]
    xs = [a.sample(noise=noise[i:i + 1], y=y[i:i + 1]) for i, a in enumerate(alone)]
    together = EarlyExitSampler(m, thr, mode="per_sample", steps=5)
    xt = together.sample(noise=noise, y=y)
    ex = torch.cat([a.trace.exits for a in alone], 1)
    assert torch.equal(together.trace.exits, ex)
    assert len(set(ex.flatten().tolist())) > 1, "the threshold should make samples exit at different layers"
    assert torch.allclose(xt, torch.cat(xs), atol=1e-5)
    # batch mode on a DiT too: a batch of one agrees with per-sample
    b = EarlyExitSampler(m, thr, mode="batch", steps=5)
    assert torch.allclose(b.sample(noise=noise[:1], y=y[:1]), xs[0], atol=1e-6)
    assert torch.equal(b.trace.exits, alone[0].trace.exits)


def test_guided_exit_layer_is_the_later_of_the_two_halves():
    """With classifier-free guidance the conditional and unconditional passes run as one batch; a
    sample's recorded exit is the later of its two halves (the blocks its eps really needed)."""
    m = EarlyExitModel(backbone(), "duodiff")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 6])
    first = _scores(m, noise, torch.full((2,), 0.999), y)[:, 0].sort().values
    thr = float(first[0] + first[1]) / 2
    g = EarlyExitSampler(m, thr, mode="per_sample", steps=4, cfg_scale=2.0)
    g.sample(noise=noise, y=y)
    assert g.trace.exits.shape == (4, 2)
    assert ((g.trace.exits >= 1) & (g.trace.exits <= m.num_blocks)).all()


def test_profile_and_calibration_reject_bad_inputs():
    m = EarlyExitModel(backbone(), "duodiff")
    res = profile_exits(m, 0.5, n=2, steps=3)  # a single number is one threshold
    assert [p["threshold"] for p in res["profiles"]] == [0.5]
    for bad, text in ((dict(thresholds=[]), "threshold"), (dict(thresholds=[1.5]), "threshold"),
                      (dict(thresholds=[float("nan")]), "threshold"), (dict(n=0), "n")):
        kw = dict(thresholds=[0.1], n=2, steps=3)
        kw.update(bad)
        with pytest.raises(ValueError, match=text):
            profile_exits(m, **kw)
    deep = backbone()
    small = json.loads(json.dumps(SPEC))
    small["kwargs"].update(img_size=4, depth=3)
    from duodiff_fast.models import create_model
    other = create_model(small)
    with pytest.raises(ValueError, match="calibrate_switch"):
        calibrate_switch(other, deep, n=2, steps=3)
    for bad, text in ((dict(tolerance_db=-1.0), "tolerance_db"), (dict(n=0), "n"), (dict(switches=[1.5]), "switches")):
        with pytest.raises(ValueError, match=text):
            calibrate_switch(backbone(depth=3), deep, **dict(dict(n=2, steps=3), **bad))
    assert DEFAULT_TOLERANCE_DB > 0 and set(DEFAULT_THRESHOLDS) == {"duodiff", "adadiff"}


def _trained_heads(tmp_path, variant="duodiff", **kw):
    bb = backbone()
    ckpt = tmp_path / "deep.safetensors"
    save_safetensors(bb, ckpt)
    spec = tmp_path / "deep.json"
    spec.write_text(json.dumps(SPEC))
    base = dict(backbone=str(spec), backbone_ckpt=str(ckpt), data="shapes:8", data_kwargs={"n": 32}, steps=2,
                batch_size=4, ckpt_every=1, log_every=1, progress=False, variant=variant)
    base.update(kw)
    res = train_exits(ExitTrainConfig(out=str(tmp_path / f"exits_{variant}"), **base))
    return bb, res, base


def test_heads_load_strictly_and_name_what_does_not_fit(tmp_path):
    bb, res, _ = _trained_heads(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(res["export"], "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["backbone_fingerprint"] == backbone_fingerprint(bb)
    # an extra tensor is an error, not ignored
    extra = tmp_path / "extra.safetensors"
    save_file(dict(sd, stray=torch.zeros(2)), str(extra), metadata=meta)
    with pytest.raises((RuntimeError, ValueError), match="stray"):
        load_exit_model(bb, extra)
    # a variant that contradicts the file is an error; the file's own variant loads
    with pytest.raises(ValueError, match="'duodiff' exit heads, not 'adadiff'"):
        load_exit_model(bb, res["export"], variant="adadiff")
    assert load_exit_model(bb, res["export"], variant="duodiff").variant == "duodiff"
    # heads trained on other weights of the same architecture load, with a warning that says so
    retrained = backbone(seed=1)
    with pytest.warns(UserWarning, match="other backbone weights"):
        load_exit_model(retrained, res["export"])
    # the fingerprint ignores float16 rounding (the shipped weights are stored in float16)
    half = backbone()
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(p.half().float())
    assert backbone_fingerprint(half) == backbone_fingerprint(bb)


def test_resume_refuses_another_dataset_or_backbone(tmp_path):
    bb, res, base = _trained_heads(tmp_path, steps=3, stop_at=1)
    out = str(tmp_path / "exits_duodiff")
    with pytest.raises(ValueError, match="data"):
        train_exits(ExitTrainConfig(out=out, resume="latest", **dict(base, data="shapes-bold:8")))
    # same checkpoint path, other weights in it: the fingerprint catches it
    save_safetensors(backbone(seed=7), base["backbone_ckpt"])
    with pytest.raises(ValueError, match="backbone's weights changed"):
        train_exits(ExitTrainConfig(out=out, resume="latest", **base))


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_train_exits_profile_calibrate_end_to_end(tmp_path, capsys):
    bb = backbone()
    ckpt, spec = tmp_path / "deep.safetensors", tmp_path / "deep.json"
    save_safetensors(bb, ckpt)
    spec.write_text(json.dumps(SPEC))
    shallow = backbone(depth=3)
    sckpt = tmp_path / "shallow.safetensors"
    save_safetensors(shallow, sckpt)
    sspec = tmp_path / "shallow.json"
    sspec.write_text(json.dumps(dict(SPEC, kwargs=dict(SPEC["kwargs"], depth=3))))
    out = tmp_path / "heads"
    train = ["train-exits", "--backbone", str(spec), "--backbone-ckpt", str(ckpt), "--data", "shapes:8",
             "--variant", "adadiff", "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]
    code, so, err = _cli(train, capsys)
    assert code == 0 and (out / "exits.safetensors").is_file(), err
    code, so, err = _cli(train, capsys)  # the folder now holds a run
    assert code == 2 and "--resume" in err and "Traceback" not in err
    prof = tmp_path / "prof"
    code, so, err = _cli(["profile", "--backbone", str(spec), "--backbone-ckpt", str(ckpt), "--exits",
                          str(out / "exits.safetensors"), "--n", "2", "--steps", "3", "--out", str(prof)], capsys)
    assert code == 0, err
    data = json.loads((prof / "exits.json").read_text())
    # no --thresholds: the defaults of the file's variant (adadiff), not of the --variant default
    assert data["variant"] == "adadiff"
    assert [p["threshold"] for p in data["profiles"]] == list(DEFAULT_THRESHOLDS["adadiff"])
    assert (prof / "exits.png").stat().st_size > 1000
    code, so, err = _cli(["profile", "--backbone", str(spec), "--backbone-ckpt", str(ckpt), "--exits",
                          str(out / "exits.safetensors"), "--variant", "duodiff", "--out", str(prof)], capsys)
    assert code == 2 and "not 'duodiff'" in err
    cal = tmp_path / "cal"
    code, so, err = _cli(["calibrate", "--deep", str(spec), "--deep-ckpt", str(ckpt), "--shallow", str(sspec),
                          "--shallow-ckpt", str(sckpt), "--exits", str(out / "exits.safetensors"), "--n", "2",
                          "--steps", "4", "--clip-sample", "0.5", "--out", str(cal)], capsys)
    assert code == 0, err
    res = json.loads((cal / "calibrate.json").read_text())
    assert res["tolerance_db"] == DEFAULT_TOLERANCE_DB and "profile_switch" in res
    assert "chosen switch" in so and (cal / "calibrate.png").is_file()
    for argv, text in ((["profile", "--thresholds", "0.2,1.5"], "thresholds"),
                       (["profile", "--out", str(prof)], "--demo"),
                       (["calibrate", "--tolerance-db", "-3"], "tolerance"),
                       (["calibrate", "--out", str(cal)], "--demo"),
                       (["train-exits", "--steps", "0"], "steps")):
        code, so, err = _cli(argv, capsys)
        assert code == 2 and text in err and "Traceback" not in err, (argv, err)


def test_cli_profile_and_calibrate_on_the_shipped_pair(tmp_path, capsys):
    code, so, err = _cli(["profile", "--demo", "--n", "2", "--steps", "3", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "p" / "exits.json").read_text())
    assert data["depth"] == 13 and len(data["mean_exit"]) == 3
    code, so, err = _cli(["calibrate", "--demo", "--n", "2", "--steps", "4", "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "c" / "calibrate.json").read_text())
    assert 0.0 <= res["chosen_switch"] <= 1.0 and 0.0 <= res["profile_switch"] <= 1.0

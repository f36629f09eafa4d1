"""Training: loss goes down, outputs are written, resume is exact, EMA, shallow init from a deep model."""
import json
import os

import pytest
import torch

from duodiff_fast.models import create_model, load_checkpoint
from duodiff_fast.train import EMA, TrainConfig, WarmupCosine, block_mapping, init_from_deep, train

# A tiny class-conditional U-ViT: 11 labels = 10 Shapes classes + the null class (label dropout / CFG).
TINY = {"family": "uvit", "time_convention": "frac1000", "schedule": {"name": "linear"},
        "kwargs": dict(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, num_classes=11)}


def tiny(depth=3, **kw):
    spec = json.loads(json.dumps(TINY))
    spec["kwargs"]["depth"] = depth
    spec["kwargs"].update(kw)
    return spec


def cfg(out, **kw):
    base = dict(model=tiny(), data="shapes:8", data_kwargs={"n": 128}, out=str(out), steps=6, batch_size=8,
                lr=1e-3, warmup_steps=2, ema_decay=0.99, log_every=1, ckpt_every=0, sample_every=0,
                progress=False, seed=3, label_dropout=0.3)
    base.update(kw)
    return TrainConfig(**base)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# -----------------------------------------------------------------------------
# A short run
# -----------------------------------------------------------------------------

def test_short_run_decreases_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = train(cfg(out, steps=40, batch_size=16, warmup_steps=4, log_every=10, ckpt_every=20,
                    sample_every=40, sample_n=4, sample_steps=5))
    log = read_log(out)
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    first, last = log[0]["loss"], log[-1]["loss"]
    print(f"loss first window {first:.4f}, last window {last:.4f}")
    assert last < 0.95 * first, f"loss did not decrease: {first:.4f} -> {last:.4f}"
    assert res["final_loss"] == pytest.approx(last) and res["step"] == 40
    assert all(r["lr"] >= 0 and r["grad_norm"] > 0 for r in log)

    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_0000020.pt", "step_0000040.pt"], ckpts
    assert res["checkpoint"] == str(out / "checkpoints" / "step_0000040.pt")
    assert res["grids"] == [str(out / "samples" / "step_0000040.png")]
    assert os.path.getsize(res["grids"][0]) > 0

    # The safetensors export is the EMA model, loadable into the spec written beside it.
    from safetensors import safe_open
    with safe_open(res["safetensors"], "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "40" and meta["weights"] == "ema"
    spec = json.loads(meta["spec"])
    with open(res["spec"]) as f:
        assert json.load(f) == spec
    ema = load_checkpoint(res["safetensors"], spec)
    ck = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ck["ema"][k]), k
    # The EMA is a real average: different from the raw weights and from the initial weights.
    torch.manual_seed(3)
    init = create_model(spec).state_dict()
    k = "in_blocks.0.attn.qkv.weight"
    assert max_diff(ck["ema"][k], ck["model"][k]) > 1e-5
    assert max_diff(ck["ema"][k], init[k]) > 1e-5
    assert ck["step"] == 40 and ck["world_size"] == 1 and len(ck["rng"]) == 1


# -----------------------------------------------------------------------------
# Exact resume
# -----------------------------------------------------------------------------

def test_resume_is_bitwise_exact(tmp_path):
    straight = train(cfg(tmp_path / "a"))
    stopped = train(cfg(tmp_path / "b", stop_at=3))
    assert stopped["step"] == 3 and stopped["checkpoint"].endswith("step_0000003.pt")
    resumed = train(cfg(tmp_path / "c", resume=stopped["checkpoint"]))
    assert resumed["step"] == 6

    A = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)
    B = torch.load(stopped["checkpoint"], map_location="cpu", weights_only=True)
    C = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)
    for part in ("model", "ema"):
        bad = {k: max_diff(A[part][k], C[part][k]) for k in A[part]
               if not torch.equal(A[part][k], C[part][k])}
        assert not bad, f"{part}: resumed != straight, max |diff| per tensor: {bad}"
    for pid, st in A["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, C["optimizer"]["state"][pid][name]), f"optimizer state {pid}.{name} differs"
    assert A["scheduler"]["last_epoch"] == C["scheduler"]["last_epoch"] == 6
    # Per-step losses after the resume point agree exactly too.
    la = {r["step"]: r["loss"] for r in read_log(tmp_path / "a")}
    lc = {r["step"]: r["loss"] for r in read_log(tmp_path / "c")}
    assert sorted(lc) == [4, 5, 6] and all(la[s] == lc[s] for s in lc), (la, lc)
    # Control: the comparison is not vacuous (steps 4..6 do move the weights).
    k = "mid_block.mlp.fc1.weight"
    assert max_diff(A["model"][k], B["model"][k]) > 1e-6


def test_resume_latest_in_out_dir(tmp_path):
    out = tmp_path / "run"
    train(cfg(out, steps=4, stop_at=2))
    res = train(cfg(out, steps=4, resume="latest"))
    assert res["step"] == 4
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]  # the log is appended to


# -----------------------------------------------------------------------------
# EMA and LR schedule
# -----------------------------------------------------------------------------

def test_ema_update_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, decay=0.9, warmup=True)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
    d = ema.current_decay()  # first update: min(0.9, (1 + 1) / (10 + 1))
    assert d == pytest.approx(2 / 11)
    ema.update(model)
    expect = d * before + (1 - d) * model.weight.detach()
    err = max_diff(ema.model.weight, expect)
    print(f"EMA max |err| {err:.3g}")
    assert err < 1e-6
    assert max_diff(ema.model.weight, model.weight) > 1e-3 and max_diff(ema.model.weight, before) > 1e-3
    assert not any(p.requires_grad for p in ema.model.parameters())
    for _ in range(100):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)


def test_warmup_cosine():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.55) and f(20) == pytest.approx(0.1)
    vals = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# -----------------------------------------------------------------------------
# Shallow companion initialised from a deep model
# -----------------------------------------------------------------------------

def test_block_mapping():
    assert block_mapping("in_blocks", 1, 6) == [0]
    assert block_mapping("out_blocks", 1, 6) == [5]
    assert block_mapping("out_blocks", 2, 6) == [4, 5]
    assert block_mapping("blocks", 3, 28) == [0, 14, 27]
    with pytest.raises(ValueError):
        block_mapping("blocks", 5, 3)


def test_init_from_deep_copies_mapped_tensors(tmp_path):
    from duodiff_fast.models import save_safetensors
    torch.manual_seed(1)
    deep = create_model(tiny(depth=7))  # 3 in-blocks, mid, 3 out-blocks
    path = tmp_path / "deep.safetensors"
    save_safetensors(deep, path)
    torch.manual_seed(2)
    shallow = create_model(tiny(depth=3))
    report = init_from_deep(shallow, str(path))
    assert report["skipped"] == [] and len(report["copied"]) == len(shallow.state_dict())
    s, d = shallow.state_dict(), deep.state_dict()
    pairs = {"in_blocks.0.attn.qkv.weight": "in_blocks.0.attn.qkv.weight",
             "mid_block.mlp.fc2.weight": "mid_block.mlp.fc2.weight",
             "out_blocks.0.skip_linear.weight": "out_blocks.2.skip_linear.weight",
             "out_blocks.0.norm1.weight": "out_blocks.2.norm1.weight",
             "pos_embed": "pos_embed", "label_emb.weight": "label_emb.weight",
             "patch_embed.proj.weight": "patch_embed.proj.weight",
             "decoder_pred.weight": "decoder_pred.weight",
             "final_layer.weight": "final_layer.weight"}
    for sk, dk in pairs.items():
        assert torch.equal(s[sk], d[dk]), f"{sk} != deep {dk} (max |diff| {max_diff(s[sk], d[dk]):.3g})"
    # The out-block comes from the deep model's last out-block, not its first.
    assert not torch.equal(s["out_blocks.0.skip_linear.weight"], d["out_blocks.0.skip_linear.weight"])

    # Through train(): with lr 0 the trained weights stay the copied ones.
    res = train(cfg(tmp_path / "shallow", steps=1, lr=0.0, warmup_steps=0, init_from_deep=str(path)))
    assert res["copied_from_deep"] == len(s)
    ck = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
    for sk, dk in pairs.items():
        assert torch.equal(ck["model"][sk], d[dk]), sk


def test_train_rejects_mismatched_data(tmp_path):
    with pytest.raises(ValueError, match="8x8|built for"):
        train(cfg(tmp_path / "x", data="shapes:16"))


def test_cli_train_arguments():
    from duodiff_fast.cli import build_parser
    args = build_parser().parse_args(["train", "--model", "m.json", "--resume", "--steps", "7",
                                      "--init-from-deep", "deep.pt", "--ema-decay", "0.999"])
    assert args.resume == "latest" and args.steps == 7 and args.init_from_deep == "deep.pt"
    assert args.ema_decay == 0.999 and args.lr == 2e-4 and args.weight_decay == 0.03
    args = build_parser().parse_args(["train", "--model", "m", "--resume", "runs/x"])
    assert args.resume == "runs/x" and args.t_range is None
    args = build_parser().parse_args(["train", "--model", "m", "--t-range", "0.4,1.0,0.8"])
    assert TrainConfig(model="m", t_range=args.t_range).validate().t_range == (0.4, 1.0, 0.8)


# -----------------------------------------------------------------------------
# Min-SNR-gamma loss weights, the position-table init
# -----------------------------------------------------------------------------

def test_min_snr_gamma_weights_each_sample_by_its_snr(tmp_path):
    from duodiff_fast.data import get_dataset
    from duodiff_fast.sampling.schedules import get_schedule
    from duodiff_fast.train import _Batch

    model = create_model(tiny())
    ds = get_dataset("shapes:8", n=32)
    sched = get_schedule({"name": "linear"})
    spec = dict(tiny(), time_convention="frac1000")
    x0, y = ds.batch(range(16))
    pred = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = {}
    for gamma in (None, 5.0, 1e9):
        b = _Batch(model, sched, spec, ds, cfg(tmp_path, min_snr_gamma=gamma), torch.device("cpu"))
        xt, tm, yy, eps = b(x0, y, torch.Generator().manual_seed(0))
        t = (tm * 1000).round().long()  # frac1000: the model time is t / 1000
        ac = sched.alphas_cumprod[t].float()
        snr = ac / (1 - ac)
        assert torch.allclose(b.snr, snr, rtol=1e-4)
        per = (pred - eps).square().flatten(1).mean(1)
        want = per.mean() if gamma is None else (per * snr.clamp(max=gamma) / snr).mean()
        losses[gamma] = b.loss(pred, eps)
        assert torch.allclose(losses[gamma], want, rtol=1e-5), (gamma, losses[gamma], want)
    # A huge gamma weighs every sample 1: plain MSE; gamma 5 weighs the nearly clean ones down.
    assert torch.allclose(losses[1e9], losses[None], rtol=1e-5)
    assert (snr > 5).any() and losses[5.0] < losses[None]


def test_min_snr_gamma_run_and_validation(tmp_path):
    res = train(cfg(tmp_path / "r", steps=4, min_snr_gamma=5.0))
    assert res["step"] == 4 and res["final_loss"] > 0
    assert json.load(open(tmp_path / "r" / "config.json"))["min_snr_gamma"] == 5.0
    for bad in (0.0, -1.0, float("nan"), "5"):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            cfg(tmp_path / "x", min_snr_gamma=bad).validate()


def test_uvit_pos_embed_std_changes_only_the_init():
    official = create_model(tiny())
    wide = create_model(tiny(pos_embed_std=1.0))
    assert 0.005 < official.pos_embed.std().item() < 0.03
    assert 0.7 < wide.pos_embed.std().item() < 1.0  # truncated at 2 std
    assert wide.pos_embed.abs().max().item() <= 2.0
    wide.load_state_dict(official.state_dict())  # same parameters, same shapes: checkpoints load either way
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.9]), torch.tensor([1, 10])
    assert torch.equal(wide(x, t, y), official(x, t, y))
    for bad in (0, -0.1, float("inf"), "1", True):
        with pytest.raises(ValueError, match="pos_embed_std"):
            create_model(tiny(pos_embed_std=bad))


# -----------------------------------------------------------------------------
# The timestep range of a shallow companion (--t-range)
# -----------------------------------------------------------------------------

def _drawn_times(tmp_path, t_range, n=4000, schedule=None):
    from duodiff_fast.data import get_dataset
    from duodiff_fast.sampling.schedules import get_schedule
    from duodiff_fast.train import _Batch
    spec = tiny() if schedule is None else dict(tiny(), schedule=schedule, time_convention="cont999")
    model = create_model(spec)
    ds = get_dataset("shapes:8", n=32)
    sched = get_schedule(spec["schedule"])
    c = cfg(tmp_path, t_range=t_range).validate()
    b = _Batch(model, sched, spec, ds, c, torch.device("cpu"))
    x0, y = ds.batch([i % 32 for i in range(n)])
    _, tm, _, _ = b(x0, y, torch.Generator().manual_seed(0))
    return tm, b


def test_t_range_draws_the_timesteps_it_names(tmp_path):
    tm, b = _drawn_times(tmp_path, "0.4,1.0")  # the CLI's string form
    assert b.t_range == (0.4, 1.0, 1.0)
    t = (tm * 1000).round().long()  # frac1000
    assert t.min() >= 400 and t.max() <= 999 and t.max() >= 990 and t.min() <= 410
    tm, _ = _drawn_times(tmp_path, (0.0, 0.25))
    t = (tm * 1000).round().long()
    assert t.min() >= 0 and t.max() <= 249
    # with p = 0.75, about a quarter of the draws come from the whole range: 0.25 * 0.4 of them below 0.4
    tm, _ = _drawn_times(tmp_path, (0.4, 1.0, 0.75))
    below = ((tm * 1000).round() < 400).float().mean().item()
    assert 0.07 < below < 0.13, below
    # no range: uniform over [0, 1000), about 40% below 400
    tm, b = _drawn_times(tmp_path, None)
    assert b.t_range is None and 0.36 < ((tm * 1000).round() < 400).float().mean().item() < 0.44


def test_t_range_on_a_continuous_schedule(tmp_path):
    tm, _ = _drawn_times(tmp_path, (0.5, 1.0), n=2000, schedule={"name": "vpsde"})
    assert tm.min() >= 0.5 * 999 - 1 and tm.max() <= 999 + 1e-3  # cont999: the model time is 999 t
    assert tm.min() <= 0.52 * 999


@pytest.mark.parametrize("bad, text", [((0.5, 0.4), "lo < hi"), ((0.1, 1.2), "t_range hi"),
                                       ((0.1, 0.9, 0.0), "p must be > 0"), ((0.1,), "t_range must be"),
                                       ("a,b", "numbers"), ((-0.1, 0.5), "t_range lo")])
def test_t_range_validation(tmp_path, bad, text):
    with pytest.raises(ValueError, match=text):
        cfg(tmp_path / "x", t_range=bad).validate()


def test_t_range_run_resumes_exactly_and_is_recorded(tmp_path):
    straight = train(cfg(tmp_path / "a", t_range=(0.4, 1.0, 0.8)))
    stopped = train(cfg(tmp_path / "b", t_range=(0.4, 1.0, 0.8), stop_at=3))
    resumed = train(cfg(tmp_path / "c", t_range=(0.4, 1.0, 0.8), resume=stopped["checkpoint"]))
    A = torch.load(straight["checkpoint"], map_location="cpu", weights_only=True)
    C = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)
    assert all(torch.equal(A["model"][k], C["model"][k]) for k in A["model"])
    assert json.load(open(tmp_path / "a" / "config.json"))["t_range"] == [0.4, 1.0, 0.8]
    # the range changes training: another run without it ends elsewhere
    plain = torch.load(train(cfg(tmp_path / "d"))["checkpoint"], map_location="cpu", weights_only=True)
    assert any(not torch.equal(A["model"][k], plain["model"][k]) for k in A["model"])
    with pytest.warns(UserWarning, match="t_range"):
        train(cfg(tmp_path / "e", t_range=(0.2, 1.0), resume=stopped["checkpoint"]))

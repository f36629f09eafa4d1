"""Multi-process: sharded sampling equals one process bitwise; 2-process gloo runs of train and sample."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from duodiff_fast.distributed import batch_seed
from duodiff_fast.sampling.sharded import merge_shards, sample_sharded
from duodiff_fast.models import create_model
from duodiff_fast.sampling import DuoSampler

TINY = {"family": "uvit", "time_convention": "frac1000", "schedule": {"name": "linear"},
        "kwargs": dict(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, num_classes=11)}


def tiny_sampler(solver="ddpm"):
    torch.manual_seed(0)
    deep = create_model(dict(TINY, kwargs=dict(TINY["kwargs"], depth=5))).eval()
    shallow = create_model(TINY).eval()
    # DDPM draws fresh noise every step: the per-batch generator has to be replayed exactly.
    return DuoSampler(shallow, deep, schedule="linear", solver=solver, steps=6, switch=0.5)


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same(a, b):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        diff = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), \
            f"{k}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, " \
            f"first at {np.argwhere(diff > 0)[:1].tolist()}"


def test_batch_seed_deterministic_and_distinct():
    seeds = {batch_seed(s, b) for s in range(4) for b in range(50)}
    assert len(seeds) == 200
    assert batch_seed(3, 7) == batch_seed(3, 7) and 0 <= batch_seed(3, 7) < 2**63


def test_sharded_sampling_is_independent_of_world_size(tmp_path):
    sampler = tiny_sampler()
    n, bs = 7, 3  # 3 batches, the last one short
    sample_sharded(sampler, n, bs, seed=5, out_dir=str(tmp_path / "w1"), progress=False)
    one = load(merge_shards(str(tmp_path / "w1")))
    assert one["arr_0"].shape == (7, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert one["labels"].shape == (7,) and one["labels"].max() < 10  # label 10 is the null class
    for r in range(4):  # 4 ranks for 3 batches: rank 3 writes an empty shard
        res = sample_sharded(sampler, n, bs, seed=5, out_dir=str(tmp_path / "w4"), rank=r, world=4,
                             progress=False)
        assert res["count"] == [3, 3, 1, 0][r]
    four = load(merge_shards(str(tmp_path / "w4")))
    assert_same(one, four)
    assert not [f for f in os.listdir(tmp_path / "w4") if f.startswith("shard_")]  # merged shards are removed
    # Another seed gives other samples (the comparison above is not vacuous).
    sample_sharded(sampler, n, bs, seed=6, out_dir=str(tmp_path / "s6"), progress=False)
    other = load(merge_shards(str(tmp_path / "s6")))
    assert not np.array_equal(one["arr_0"], other["arr_0"])


def test_merge_detects_missing_shard(tmp_path):
    sampler = tiny_sampler(solver="ddim")
    for r in range(2):
        sample_sharded(sampler, 4, 1, seed=0, out_dir=str(tmp_path), rank=r, world=2, progress=False)
    os.remove(tmp_path / "shard_001.npz")
    with pytest.raises(ValueError, match="missing"):
        merge_shards(str(tmp_path))


def test_latent_samples_are_float(tmp_path):
    torch.manual_seed(0)
    spec = dict(TINY, kwargs=dict(TINY["kwargs"], in_chans=4, num_classes=-1))
    m = create_model(spec).eval()
    sampler = DuoSampler(m, m, schedule="linear", solver="ddim", steps=3, switch=0)
    sample_sharded(sampler, 3, 2, seed=1, out_dir=str(tmp_path), progress=False)
    z = load(merge_shards(str(tmp_path)))
    assert sorted(z) == ["latents"]
    assert z["latents"].shape == (3, 4, 8, 8) and z["latents"].dtype == np.float32


# -----------------------------------------------------------------------------
# Two real processes (torchrun, gloo on CPU)
# -----------------------------------------------------------------------------

SAMPLE_ARGS = ["--n", "7", "--batch-size", "2", "--steps", "4", "--switch", "0.5", "--solver", "ddpm",
               "--seed", "11", "--device", "cpu"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One torchrun launch (process start-up dominates the cost): train, then sample, on 2 gloo ranks.

    The script goes through `duodiff_fast.cli.main`, i.e. what `duodiff-fast train/sample` run. (Under
    torchrun the CLI is best launched this way or with `-m duodiff_fast.cli`: torchrun's own parser
    rejects a later "--n" as an ambiguous prefix of --nnodes/--nproc_per_node.)
    """
    root = tmp_path_factory.mktemp("ddp")
    spec = root / "tiny.json"
    spec.write_text(json.dumps(TINY))
    run = root / "run"
    train_args = ["train", "--model", str(spec), "--data", "shapes:8", "--data-kwargs", '{"n": 64}',
                  "--steps", "4", "--batch-size", "8", "--out", str(run), "--ckpt-every", "2",
                  "--sample-every", "4", "--sample-n", "4", "--sample-steps", "3", "--log-every", "2",
                  "--no-progress", "--device", "cpu"]
    sample_args = ["sample", "--deep", str(run / "model.json"), "--deep-ckpt", str(run / "ema.safetensors"),
                   *SAMPLE_ARGS, "--out", str(root / "two")]
    script = root / "job.py"
    script.write_text(
        "from duodiff_fast.cli import main\n"
        "from duodiff_fast.distributed import cleanup_distributed, init_distributed, get_world_size\n"
        "init_distributed('cpu')\n"
        "assert get_world_size() == 2\n"
        f"assert main({train_args!r}) == 0\n"
        f"assert main({sample_args!r}) == 0\n"
        "cleanup_distributed()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DUODIFF_BACKEND="torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, \
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dict(root=root, run=run, stdout=proc.stdout)


def test_torchrun_two_process_training(two_process_run):
    out, stdout = two_process_run["run"], two_process_run["stdout"]
    assert stdout.count("step 4: loss") == 1, stdout  # only rank 0 reports
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [2, 4] and all(math.isfinite(r["loss"]) for r in log), log
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]
    assert os.path.exists(out / "ema.safetensors") and os.path.exists(out / "samples" / "step_0000004.png")
    ck = torch.load(out / "checkpoints" / "step_0000004.pt", map_location="cpu", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # ranks draw different streams
    with open(out / "config.json") as f:
        assert json.load(f)["world_size"] == 2


def test_torchrun_two_process_sampling_matches_one_process(two_process_run, tmp_path):
    from duodiff_fast.cli import main
    run, two = two_process_run["run"], two_process_run["root"] / "two"
    with pytest.warns(UserWarning, match="random weights"):  # the shallow model has no checkpoint
        assert main(["sample", "--deep", str(run / "model.json"), "--deep-ckpt", str(run / "ema.safetensors"),
                     *SAMPLE_ARGS, "--out", str(tmp_path / "one")]) == 0
    one, two_ = load(tmp_path / "one" / "samples.npz"), load(two / "samples.npz")
    assert one["arr_0"].shape == (7, 8, 8, 3)
    assert_same(one, two_)
    with open(two / "samples.json") as f:
        meta = json.load(f)
    assert meta["world_size"] == 2 and meta["n"] == 7 and meta["shallow_steps"] == 2
    assert os.path.exists(two / "grid.png")
    assert not [f for f in os.listdir(two) if f.startswith("shard_")]

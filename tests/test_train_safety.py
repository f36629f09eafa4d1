"""Training never loses a run: occupied folders are refused, pruning is run-owned, exports are atomic and
repaired on resume, a damaged newest checkpoint falls back to the previous one, bad configs are refused
before any work."""
import json
import os
import warnings

import pytest
import torch

from duodiff_fast.train import list_checkpoints, train

from .test_train import cfg


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def steps_of(out):
    return [int(os.path.basename(p)[5:12]) for p in list_checkpoints(str(out))]


def test_issue_reproduction_second_run_into_an_occupied_folder_is_refused(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=6, ckpt_every=2))
    before = snapshot(out)
    with pytest.raises(FileExistsError) as e:
        train(cfg(out, steps=3, ckpt_every=1))
    msg = str(e.value)
    print(msg)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg and "step 6" in msg
    assert snapshot(out) == before  # nothing was touched


def test_overwrite_starts_over_and_removes_only_the_old_runs_files(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=6, ckpt_every=2))
    (out / "notes.txt").write_text("mine")  # not a run file: must survive
    train(cfg(out, steps=3, ckpt_every=1, overwrite=True))
    assert steps_of(out) == [2, 3]  # keep 2 newest of *this* run; nothing of the old run is left
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"
    from safetensors import safe_open
    with safe_open(str(out / "ema.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "3"


def test_resume_and_overwrite_exclude_each_other_and_validation_happens_first(tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite"):
        train(cfg(tmp_path / "x", resume="latest", overwrite=True))
    assert not (tmp_path / "x").exists()


def test_pruning_keeps_the_runs_own_checkpoints(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=8, ckpt_every=2, stop_at=4, keep_checkpoints=2))
    assert steps_of(out) == [2, 4]
    train(cfg(out, steps=8, ckpt_every=2, keep_checkpoints=2, resume="latest"))
    assert steps_of(out) == [6, 8]


def read_export(path):
    """(tensors, metadata) of a safetensors export (its header's key order is not deterministic)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        # clone: the tensors are memory-mapped, and the test truncates the file in place afterwards
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()


def test_resume_of_finished_run_rewrites_a_truncated_export(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=4, ckpt_every=2))
    good_t, good_m = read_export(out / "ema.safetensors")
    data = (out / "ema.safetensors").read_bytes()
    (out / "ema.safetensors").write_bytes(data[: len(data) // 3])  # a kill during the final export
    res = train(cfg(out, steps=4, ckpt_every=2, resume="latest"))
    assert res["step"] == 4
    for _ in range(2):
        t, m = read_export(out / "ema.safetensors")
        assert m == good_m and t.keys() == good_t.keys()
        assert all(torch.equal(t[k], good_t[k]) for k in t)
        (out / "ema.safetensors").unlink()  # second round: a missing export is rewritten too
        train(cfg(out, steps=4, ckpt_every=2, resume="latest"))


def test_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=6, ckpt_every=2, stop_at=4, keep_checkpoints=0))
    newest = list_checkpoints(str(out))[-1]
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:
        f.write(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train(cfg(out, steps=6, ckpt_every=2, keep_checkpoints=0, resume="latest"))
    texts = [str(x.message) for x in w]
    assert any(newest in t and "previous" in t for t in texts), texts
    assert res["step"] == 6
    # The run continued from step 2 and rewrote step 4 intact.
    ck = torch.load(newest, map_location="cpu", weights_only=True)
    assert ck["step"] == 4


def test_resume_with_another_model_is_refused(tmp_path):
    from .test_train import tiny
    out = tmp_path / "R"
    train(cfg(out, steps=2, ckpt_every=1))
    with pytest.raises(ValueError, match="another model"):
        train(cfg(out, steps=2, model=tiny(depth=5), resume="latest"))


def test_log_lines_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    out = tmp_path / "R"
    train(cfg(out, steps=6, ckpt_every=2, stop_at=4))
    with open(out / "log.jsonl", "a") as f:  # a crash after step 5 was logged but before a checkpoint
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
    train(cfg(out, steps=6, ckpt_every=2, resume="latest"))
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("field,value,text", [
    ("batch_size", 0, "batch_size"), ("steps", 0, "steps"), ("betas", (0.9,), "betas"),
    ("betas", (0.9, 1.5), "betas"), ("lr", float("nan"), "lr"), ("lr", -1e-3, "lr"),
    ("ema_decay", 1.5, "ema_decay"), ("label_dropout", 1.0, "label_dropout"), ("steps", 2.5, "steps"),
    ("batch_size", "8", "batch_size"), ("log_every", 0, "log_every"), ("keep_checkpoints", -1, "keep"),
    ("precision", "fp16", "precision"), ("sample_n", 0, "sample_n"),
])
def test_bad_configs_are_refused_naming_the_field(tmp_path, field, value, text):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=text) as e:
        train(cfg(out, **{field: value}))
    assert repr(value) in str(e.value) or f"{value:g}" in str(e.value) if isinstance(value, float) \
        else repr(value) in str(e.value) or str(value) in str(e.value) or field == "betas"
    assert not out.exists()  # refused before anything was created


def test_unwritable_out_fails_before_training(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises((OSError, ValueError), match="file"):
            train(cfg(blocker / "run"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OSError, match="not writable"):
            train(cfg(ro / "run"))

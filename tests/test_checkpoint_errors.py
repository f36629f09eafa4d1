"""load_checkpoint on files that are not (readable) checkpoints: one CheckpointError (a ValueError) naming
the path and what was expected, FileNotFoundError for a missing path, and the file left as it was."""
import argparse
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from duodiff_fast.models import load_checkpoint, save_safetensors
from duodiff_fast.models.checkpoint import CheckpointError, read_state_dict, sniff_format
from duodiff_fast.models.configs import create_model

# A tiny DiT preset: small files, fast loads.
TINY = dict(family="dit", kwargs=dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                      num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10,
                                      learn_sigma=True),
            time_convention="int", schedule=dict(name="linear"), description="tiny DiT")


def tiny_sd():
    torch.manual_seed(0)
    return create_model(TINY).state_dict()


def snapshot(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mtime_ns, st.st_size


def assert_refused(path, *expected_in_message, exc=CheckpointError):
    """load_checkpoint(path) raises `exc` whose message names the path and `expected_in_message`; the file
    (if any) is byte-for-byte and time-stamp unchanged."""
    before = snapshot(path) if os.path.isfile(path) else None
    with pytest.raises(exc) as e:
        load_checkpoint(path, TINY)
    msg = str(e.value)
    print(msg)
    assert str(path) in msg, f"path not named: {msg}"
    for text in expected_in_message:
        assert text in msg, f"{text!r} not in: {msg}"
    if before is not None:
        assert snapshot(path) == before, "the file changed"
    return msg


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.pt")
    assert_refused(path, "not found", "expected", exc=FileNotFoundError)
    assert not os.path.exists(path)


@pytest.mark.parametrize("contents", ["empty", "files", "run"])
def test_directory_that_is_no_diffusers_folder(tmp_path, contents):
    d = tmp_path / "ckpt_dir"
    d.mkdir()
    if contents == "files":
        write(d / "notes.txt", b"hello")
    if contents == "run":
        torch.save(tiny_sd(), d / "model.pt")
        save_safetensors(create_model(TINY), d / "ema.safetensors")
        (d / "config.json").write_text(json.dumps({"steps": 10}))  # a training run's config, not diffusers'
    before = sorted(os.listdir(d))
    msg = assert_refused(str(d), "is a directory", "diffusers model folder", "expected")
    if contents == "run":
        assert "ema.safetensors" in msg  # the hint
    assert sorted(os.listdir(d)) == before


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors", "empty"])
def test_empty_file(tmp_path, name):
    assert_refused(write(tmp_path / name, b""), "empty (0 bytes)", "expected")


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.98])
def test_truncated_zip_pt(tmp_path, fraction):
    full = tmp_path / "full.pt"
    torch.save(tiny_sd(), full)
    data = full.read_bytes()
    path = write(tmp_path / "cut.pt", data[: int(len(data) * fraction)])
    assert_refused(path, "truncated or corrupt", "expected")


def test_truncated_legacy_pickle_pt(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(tiny_sd(), full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    assert sniff_format(str(full)) == "pickle"
    path = write(tmp_path / "cut.pt", data[: len(data) // 2])
    assert_refused(path, "expected")


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors(tmp_path, cut):
    full = tmp_path / "full.safetensors"
    save_file(tiny_sd(), str(full))
    data = full.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    keep = header // 2 if cut == "header" else header + (len(data) - header) // 2
    path = write(tmp_path / "cut.safetensors", data[:keep])
    assert_refused(path, "truncated", "expected")


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_safetensors_name_with_torch_content(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    torch.save(tiny_sd(), path, _use_new_zipfile_serialization=kind == "zip")
    assert_refused(str(path), "name says .safetensors", "rename it to .pt", "expected")


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin"])
def test_torch_name_with_safetensors_content(tmp_path, ext):
    path = tmp_path / f"model{ext}"
    save_file(tiny_sd(), str(path))
    assert_refused(str(path), f"name says {ext}", "rename it to .safetensors", "expected")


def test_content_decides_for_unknown_extensions(tmp_path):
    """A valid file with an unknown (or no) extension loads by content."""
    sd = tiny_sd()
    a, b = tmp_path / "weights", tmp_path / "weights.ckpt2"
    save_file(sd, str(a))
    torch.save(sd, b)
    for p in (a, b):
        model = load_checkpoint(str(p), TINY)
        assert torch.equal(model.final_layer.linear.weight, sd["final_layer.linear.weight"])


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    import numpy as np
    np.savez(tmp_path / "arrays.npz", x=np.ones(3, np.float32))
    os.replace(tmp_path / "arrays.npz", tmp_path / "arrays.pt")
    assert_refused(str(tmp_path / "arrays.pt"), "zip archive without torch.save's data.pkl", "expected")


@pytest.mark.parametrize("name", ["noise.pt", "noise.safetensors", "noise"])
def test_random_bytes(tmp_path, name):
    data = bytes(random.Random(0).getrandbits(8) for _ in range(4096))
    assert_refused(write(tmp_path / name, data), "expected")


class NotATensor:
    pass


def test_pickle_needing_unsafe_globals(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": tiny_sd(), "extra": NotATensor()}, path)
    assert_refused(str(path), "weights-only load refuses", "NotATensor", "expected")


@pytest.mark.parametrize("obj", ["dict_of_ints", "list", "empty_dict", "nested_no_tensors", "empty_safetensors"])
def test_file_without_tensors(tmp_path, obj):
    if obj == "empty_safetensors":
        path = tmp_path / "none.safetensors"
        save_file({}, str(path))
    else:
        path = tmp_path / "none.pt"
        torch.save({"dict_of_ints": {"a": 1, "b": 2}, "list": [1, 2, 3], "empty_dict": {},
                    "nested_no_tensors": {"model": {"x": 1}, "args": argparse.Namespace(a=1)}}[obj], path)
    assert_refused(str(path), "no state_dict found", "expected")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_non_floating_weights_refused(tmp_path, dtype, fmt):
    sd = tiny_sd()
    key = "blocks.1.mlp.fc1.weight"
    sd[key] = (sd[key] * 100).to(dtype)
    path = tmp_path / f"ints.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    assert_refused(str(path), key, str(dtype), "non-floating", "tiny DiT")


def test_mismatch_names_path_and_preset(tmp_path):
    sd = tiny_sd()
    del sd["final_layer.linear.bias"]
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    assert_refused(str(path), "does not match preset 'tiny DiT'", "final_layer.linear.bias")


def test_fp16_weights_still_load(tmp_path):
    sd = {k: v.half() for k, v in tiny_sd().items()}
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    model = load_checkpoint(str(path), TINY)
    assert model.pos_embed.dtype == torch.float32
    assert torch.equal(model.pos_embed, sd["pos_embed"].float())


@pytest.mark.parametrize("fmt", ["pt", "legacy", "safetensors"])
def test_any_damage_gives_one_clear_error(tmp_path, fmt):
    """Generalisation: every truncation point and random byte damage of a valid file either still loads
    (damage inside tensor payloads cannot be detected) or raises CheckpointError naming the path; never a
    raw torch/safetensors/pickle exception, never a changed file."""
    sd = tiny_sd()
    full = tmp_path / ("full.safetensors" if fmt == "safetensors" else "full.pt")
    if fmt == "safetensors":
        save_file(sd, str(full))
    else:
        torch.save(sd, full, _use_new_zipfile_serialization=fmt == "pt")
    data = full.read_bytes()
    rng = random.Random(1)
    variants = [data[:n] for n in sorted({0, 1, 7, 8, 9, 16, 64, 200, len(data) - 1}
                                         | {rng.randrange(len(data)) for _ in range(12)})]
    for _ in range(12):  # overwrite a random run of bytes
        b = bytearray(data)
        start = rng.randrange(len(b))
        for i in range(start, min(len(b), start + rng.randint(1, 64))):
            b[i] = rng.getrandbits(8)
        variants.append(bytes(b))
    outcomes = {"loaded": 0, "refused": 0}
    for i, v in enumerate(variants):
        path = write(tmp_path / f"damaged_{i}{full.suffix}", v)
        before = snapshot(path)
        try:
            load_checkpoint(path, TINY)
            outcomes["loaded"] += 1
        except CheckpointError as e:
            assert path in str(e) and "expected" in str(e), str(e)
            outcomes["refused"] += 1
        assert snapshot(path) == before
    print(fmt, outcomes)
    assert outcomes["refused"] >= 10


def test_read_state_dict_names_path(tmp_path):
    path = write(tmp_path / "x.pt", b"\x00" * 100)
    with pytest.raises(CheckpointError, match="x.pt"):
        read_state_dict(path)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# -----------------------------------------------------------------------------
# diffusers folders (written without diffusers: export_diffusers needs only safetensors + json)
# -----------------------------------------------------------------------------

def _export(tmp_path, name="transformer"):
    import warnings

    from duodiff_fast.models.diffusers_io import export_diffusers
    torch.manual_seed(0)
    model = create_model(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_diffusers(model, tmp_path / name)


def test_diffusers_folder_errors(tmp_path):
    folder = _export(tmp_path)
    assert load_checkpoint(folder, TINY) is not None
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.loads(Path(cfg_path).read_text())

    # weights truncated: the shard's own error names the file
    data = Path(weights).read_bytes()
    write(weights, data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*truncated"):
        load_checkpoint(folder, TINY)
    # weights missing
    os.remove(weights)
    msg = assert_refused(folder, "no weights found", "config.json")
    write(weights, data)
    # config not JSON
    with open(cfg_path, "w") as f:
        f.write("{not json")
    assert_refused(folder, "not valid JSON")
    # another class
    with open(cfg_path, "w") as f:
        json.dump(dict(cfg, _class_name="UNet2DModel"), f)
    assert_refused(folder, "UNet2DModel", "expected a DiT transformer")
    # config disagrees with the preset
    with open(cfg_path, "w") as f:
        json.dump(dict(cfg, num_layers=3, sample_size=16), f)
    msg = assert_refused(folder, "does not match preset 'tiny DiT'", "num_layers: folder 3 vs preset 2",
                         "sample_size: folder 16 vs preset 8")
    del msg


def test_diffusers_folder_strict_keys(tmp_path):
    from safetensors.torch import load_file
    folder = _export(tmp_path)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    dsd = load_file(weights)
    bad = dict(dsd)
    del bad["transformer_blocks.1.attn1.to_k.bias"]
    bad["transformer_blocks.0.extra.weight"] = torch.zeros(2)
    save_file(bad, weights)
    assert_refused(folder, "missing keys: transformer_blocks.1.attn1.to_k.bias",
                   "unexpected keys: transformer_blocks.0.extra.weight")
    bad = dict(dsd)
    bad["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = torch.randn_like(
        dsd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"])
    save_file(bad, weights)
    assert_refused(folder, "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight differs",
                   "one shared")
    bad = dict(dsd)
    bad["proj_out_2.bias"] = bad["proj_out_2.bias"].to(torch.int32)
    save_file(bad, weights)
    assert_refused(folder, "final_layer.linear.bias", "torch.int32", "non-floating")


def test_diffusers_sharded_folder_errors(tmp_path):
    from safetensors.torch import load_file
    folder = _export(tmp_path)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    dsd = load_file(weights)
    os.remove(weights)
    keys = sorted(dsd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: dsd[k] for k in ks}, os.path.join(folder, name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    index_path = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(index_path, "w") as f:
        json.dump(index, f)
    model = load_checkpoint(folder, TINY)  # sharded loads
    assert model.numerics["time_freq_shift"] == 1
    # an index pointing a key at the wrong shard
    wrong = dict(index["weight_map"])
    wrong[keys[0]] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    with open(index_path, "w") as f:
        json.dump({"weight_map": wrong}, f)
    assert_refused(folder, "shard index", keys[0])
    # an index naming an absent shard
    wrong[keys[0]] = "diffusion_pytorch_model-00003-of-00002.safetensors"
    with open(index_path, "w") as f:
        json.dump({"weight_map": wrong}, f)
    assert_refused(folder, "not there", "00003-of-00002")
    # a broken index
    with open(index_path, "w") as f:
        f.write("[]")
    assert_refused(folder, "not a valid shard index")

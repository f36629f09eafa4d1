"""CLI user errors: one line `duodiff-fast: error: ...`, exit status 2, no traceback, and nothing started."""
import os
import subprocess
import sys
import time

import pytest

from duodiff_fast.cli import main


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,text", [
    (["train", "--model", "uvit_shapes32_demo", "--batch-size", "0"], "batch"),
    (["train", "--model", "uvit_shapes32_demo", "--betas", "0.9"], "betas"),
    (["train", "--model", "uvit_shapes32_demo", "--betas", "0.9,x"], "betas"),
    (["train", "--model", "no_such_preset"], "no_such_preset"),
    (["demo", "--n", "0"], "--n"),
    (["demo", "--switches", "0.2,1.5"], "switches"),
    (["demo", "--cfg", "-1"], "--cfg"),
    (["demo", "--shallow-cfg", "-1"], "--shallow-cfg"),
    (["demo", "--shallow-cfg", "lots"], "--shallow-cfg"),
    (["sample", "--deep", "dit_s_8", "--cfg", "-1"], "--cfg"),
    (["sample", "--deep", "dit_s_8", "--n", "2.7"], "--n"),
    (["sample", "--deep", "dit_s_8", "--switch", "1.5"], "switch"),
    (["sample", "--deep", "dit_s_8", "--steps", "0"], "--steps"),
    (["sample", "--deep", "dit_s_8", "--solver", "euler"], "solver"),
    (["sample", "--deep", "nope"], "nope"),
    (["eval", "--samples", "/nonexistent/s.npz", "--reference-data", "shapes"], "/nonexistent/s.npz"),
])
def test_user_errors_print_one_line_and_exit_2(argv, text, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] in ("train", "demo", "sample") else [])
    code, err = run(argv, capsys)
    print(err)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("duodiff-fast: error:"), err
    assert text in lines[0] and "Traceback" not in err


def test_occupied_train_folder_is_a_one_line_error(capsys, tmp_path):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_0000004.pt").write_bytes(b"x")
    (out / "log.jsonl").write_text("{}\n")
    code, err = run(["train", "--model", "uvit_shapes32_demo", "--out", str(out)], capsys)
    assert code == 2 and "already holds a training run" in err and "--overwrite" in err
    assert (out / "log.jsonl").read_text() == "{}\n"


def test_unwritable_out_fails_before_sampling(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    code, err = run(["demo", "--out", str(blocker / "demo")], capsys)
    assert code == 2 and str(blocker) in err
    assert time.perf_counter() - t0 < 10  # refused up front, not after a minute of sampling
    code, err = run(["sample", "--deep", "dit_s_8", "--out", str(blocker)], capsys)
    assert code == 2 and "not a folder" in err


def test_debug_variable_shows_the_traceback(tmp_path):
    env = dict(os.environ, DUODIFF_DEBUG="1")
    proc = subprocess.run([sys.executable, "-m", "duodiff_fast.cli", "sample", "--deep", "nope", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "nope" in proc.stderr
    env.pop("DUODIFF_DEBUG")
    proc = subprocess.run([sys.executable, "-m", "duodiff_fast.cli", "sample", "--deep", "nope", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("duodiff-fast: error:")

"""bench/early_exit.py end to end on a tiny run of the shipped pair and exit heads (CPU, seconds)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_early_exit", os.path.join(ROOT, "bench", "early_exit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_early_exit_bench_writes_paired_differences(tmp_path):
    bench = _bench()
    rc = bench.main(["--n", "10", "--steps", "4", "--switches", "0.5", "--thresholds", "0.7",
                     "--batch-size", "10", "--reference-n", "64", "--cfg", "3", "--shallow-cfg", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("early_exit_*_adadiff_*.json")
    saved = json.loads(js.read_text())
    rows = saved["rows"]
    assert saved["meta"]["cfg_scale"] == 3.0 and saved["meta"]["shallow_cfg_scale"] == 1.0
    # DuoDiff 0.5: 2 unguided steps of the 3-block companion, 2 guided steps of the 13-block model
    assert rows[1]["theoretical_speedup"] == pytest.approx((13 * 2 * 4) / (3 * 2 + 13 * 2 * 2))
    assert [r["mode"] for r in rows] == ["deep-only", "DuoDiff 0.5", "shallow-only", "adadiff exit 0.7"]
    deep = rows[0]
    assert "class_acc_diff_vs_deep" not in deep and "fid_diff_vs_deep" not in deep
    for r in rows[1:]:
        assert r["class_acc_diff_vs_deep"] == pytest.approx(r["class_acc"] - deep["class_acc"])
        assert r["class_acc_diff_low"] <= r["class_acc_diff_vs_deep"] <= r["class_acc_diff_high"]
        assert r["fid_diff_low"] <= r["fid_diff_high"]
    md = js.with_suffix(".md").read_text()
    assert "guidance 3.0 (shallow steps 1)" in md and "accuracy - deep (points)" in md and md.count("\n| ") == len(rows) + 1  # header + one line per mode
    assert js.with_suffix(".png").stat().st_size > 0

"""`python -m duodiff_fast.info` and the extension finder `duodiff_fast._cpp_lib` behind it."""
import importlib.machinery
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from duodiff_fast import _cpp_lib
from duodiff_fast import info as info_mod
from duodiff_fast.ops import OPS
from duodiff_fast.ops import _registry as _dispatch


def _run_info(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DUODIFF_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "duodiff_fast.info", *args], capture_output=True, text=True,
                          timeout=120, env={**base, **env}, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_info_text_names_versions_extension_and_backends():
    out = _run_info()
    print(out)
    assert f"torch        {torch.__version__}" in out
    assert "triton       " in out and "python       " in out
    assert "_C extension" in out and "devices" in out
    for op in OPS:
        assert f"  {op} " in out, op
    if not torch.cuda.is_available():
        assert out.count("-> torch") == len(OPS)
        assert "not triton: needs CUDA tensors" in out
        assert "not cuda: duodiff_fast._C is not built" in out
        assert "GPU" in out.splitlines()[-1]


def test_info_json_with_interpreter_and_forced_backend(monkeypatch, capsys):
    # in-process (conftest.py set TRITON_INTERPRET=1 on CPU before triton was imported)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DUODIFF_BACKEND", "triton")
    _dispatch.clear_caches()
    assert info_mod.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["env"]["TRITON_INTERPRET"] == "1" and info["env"]["DUODIFF_BACKEND"] == "triton"
    assert set(info["ops"]) == set(OPS)
    assert info["extension"]["built"] is False or info["extension"]["archs"] is not None
    for entry in info["ops"].values():
        assert entry["forced_by"] == "DUODIFF_BACKEND=triton"
        assert set(entry["reasons"]) == set(_dispatch.BACKEND_NAMES)
        assert entry["reasons"]["torch"] == []
        if not torch.cuda.is_available():
            # bf16 is not the CPU default, so the interpreter can run every op here
            assert entry["chosen"] == "triton", entry


# --------------------------------------------------------------------------------------------------
# _cpp_lib: typed errors, one warning, build metadata compared with what runs
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_cpp_lib():
    _cpp_lib._reset_for_tests()
    _dispatch.clear_caches()
    yield
    _cpp_lib._reset_for_tests()
    _dispatch.clear_caches()


def _fake_extension(monkeypatch, build_info, ops=("attention", "norm", "exit_confidence")):
    mod = types.ModuleType(_cpp_lib.MODULE)
    mod.__spec__ = importlib.machinery.ModuleSpec(_cpp_lib.MODULE, None, origin="/fake/_C.so")
    if build_info is not None:
        mod.build_info = lambda: build_info
    for name in ops:
        setattr(mod, name, lambda *a: None)
    monkeypatch.setitem(sys.modules, _cpp_lib.MODULE, mod)
    return mod


@pytest.mark.skipif(importlib.util.find_spec("duodiff_fast._C") is not None,
                    reason="the extension is built here")
def test_not_built_is_quiet_and_typed(fresh_cpp_lib, monkeypatch):
    monkeypatch.setenv("DUODIFF_SKIP_CUDA_BUILD", "1")  # a GPU machine would otherwise JIT-build it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not being built is normal on CPU: no warning
        st = _cpp_lib.status()
        with pytest.raises(_cpp_lib.ExtensionNotBuiltError, match="not built"):
            _cpp_lib.get()
    assert st["built"] is False and st["loaded"] is False and st["archs"] == []
    assert "pip install" in st["hint"]
    assert _cpp_lib.unavailable_reasons() == ["duodiff_fast._C is not built"]


def test_mismatched_build_raises_and_warns_once(fresh_cpp_lib, monkeypatch):
    _fake_extension(monkeypatch, {"torch": "1.13.0", "cuda": "11.7", "archs": "80;90a"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(_cpp_lib.ExtensionMismatchError, match="running torch"):
            _cpp_lib.get()
        with pytest.raises(_cpp_lib.ExtensionMismatchError):
            _cpp_lib.get()
        _cpp_lib.status()
    ours = [w for w in record if issubclass(w.category, RuntimeWarning) and "duodiff_fast" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "built for torch 1.13.0" in str(ours[0].message)
    qkv = torch.randn(1, 4, 3, 1, 32)
    reasons = _dispatch.all_reasons(_dispatch.describe("attention", ("qkv",), (qkv,)))["cuda"]
    assert any("built for torch 1.13.0" in r for r in reasons), reasons


def test_import_failure_is_a_load_error(fresh_cpp_lib, monkeypatch):
    spec = importlib.machinery.ModuleSpec(_cpp_lib.MODULE, None, origin="/fake/_C.so")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        return spec if name == _cpp_lib.MODULE else real_find_spec(name, *a)

    def import_module(name, *a):
        raise ImportError("/fake/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")

    monkeypatch.setattr(_cpp_lib.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(_cpp_lib.importlib, "import_module", import_module)
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        st = _cpp_lib.status()
    assert st["built"] is True and st["loaded"] is False
    with pytest.raises(_cpp_lib.ExtensionLoadError, match="undefined symbol"):
        _cpp_lib.get()


def test_matching_build_loads_and_reports_archs(fresh_cpp_lib, monkeypatch):
    build = {"torch": torch.__version__.split("+")[0] + "+cu124", "cuda": torch.version.cuda,
             "archs": "80;90a"}
    mod = _fake_extension(monkeypatch, build, ops=("attention", "norm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cpp_lib.get() is mod
    st = _cpp_lib.status()
    assert st["loaded"] and st["archs"] == ["80", "90a"] and st["missing_ops"] == ["exit_confidence"]
    assert _cpp_lib.arch_supported(9, 0) and _cpp_lib.arch_supported(8, 6)  # 90a exact; 80 runs on 8.x
    assert _cpp_lib.arch_supported(8, 0) and not _cpp_lib.arch_supported(10, 0)
    assert not _cpp_lib.arch_supported(7, 5)
    h = torch.randn(2, 3, 8)
    inp = _dispatch.describe("exit_confidence", ("h", "weight", "bias"),
                             (h, torch.randn(8, 1), torch.randn(1)))
    assert "duodiff_fast._C has no exit_confidence()" in _dispatch.all_reasons(inp)["cuda"]


def test_parse_archs_accepts_common_spellings():
    assert _cpp_lib.parse_archs("80;90a") == ["80", "90a"]
    assert _cpp_lib.parse_archs("8.0 9.0a") == ["80", "90a"]
    assert _cpp_lib.parse_archs("sm_80,sm_90a") == ["80", "90a"]
    assert _cpp_lib.parse_archs(None) == []

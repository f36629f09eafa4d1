"""The op registry: one declaration per op, one implementation class per (op, backend), everything else
derived; plus the same verdict from every backend on the same inputs (issue: reliability)."""
import json
import os

import pytest
import torch

from duodiff_fast import ops
from duodiff_fast.ops import _registry

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    _registry.clear_caches()
    yield
    _registry.clear_caches()


def test_every_op_is_declared_once_with_reference_examples_and_work_model():
    assert set(ops.OPS) == {"attention", "layer_norm", "add_layer_norm", "adaln", "gated_adaln",
                            "exit_confidence"}
    for name, spec in ops.SPECS.items():
        assert spec.name == name and spec.inputs and callable(spec.reference) and callable(spec.bytes)
        for kind in ("typical", "small"):
            for label, args in spec.examples(torch.device("cpu"), torch.float32, kind).items():
                n = len(spec.inputs)
                assert all(a is None or isinstance(a, torch.Tensor) for a in args[:n]), (name, label)
                assert spec.bytes(args) > 0
                if spec.flops is not None:
                    assert spec.flops(args) > 0
        assert "torch" in ops.IMPLS[name], f"{name} has no torch fallback"


def test_implementation_classes_answer_support_and_run():
    for op, impls in ops.IMPLS.items():
        for backend, cls in impls.items():
            assert cls.OP == op and cls.BACKEND == backend
            assert callable(cls.not_supported_reasons) and callable(cls.apply)


def test_derived_tables_come_from_the_registry():
    mods = _registry.kernel_modules()
    assert mods == {"attention": ["attention"], "norm": ["layer_norm", "add_layer_norm", "adaln", "gated_adaln"],
                    "exit_confidence": ["exit_confidence"]}
    assert set(_registry.cuda_functions()) == {"attention", "norm", "exit_confidence"}
    from duodiff_fast.info import _typical_inputs
    assert set(_typical_inputs(torch.device("cpu"), torch.float32)) == set(ops.OPS)


def test_a_new_op_and_backend_is_one_declaration_plus_one_registration(monkeypatch):
    monkeypatch.setattr(_registry, "OPS", dict(_registry.OPS))
    monkeypatch.setattr(_registry, "IMPLS", {k: dict(v) for k, v in _registry.IMPLS.items()})

    def ref(x, upcast=False):
        return (x.double() if upcast else x) * 2

    _registry.register_op(_registry.OpSpec(
        name="double", inputs=("x",), summary="2x", reference=ref,
        examples=lambda d, t, k="bench": {"x": (torch.ones(3, device=d, dtype=t),)},
        bytes=lambda a: 2 * a[0].numel() * a[0].element_size()))

    @_registry.register_impl
    class TorchDouble(_registry.TorchImpl):
        OP = "double"
        apply = staticmethod(lambda x: x * 2)

    x = torch.ones(3)
    assert _registry.choose("double", ("x",), (x,), None) == "torch"
    inp = _registry.describe("double", ("x",), (x,))
    assert _registry.all_reasons(inp)["triton"] == ["has no double implementation"]
    with pytest.raises(ValueError, match="backend 'triton' was forced"):
        _registry.choose("double", ("x",), (x,), "triton")


def test_triton_comes_first_without_a_measurement_and_the_table_can_reorder(monkeypatch, tmp_path):
    assert _registry.priority("attention", "sm_90") == ("triton", "cuda", "torch")
    table = tmp_path / "order.json"
    table.write_text(json.dumps({"order": {"attention": {"sm_90": ["cuda", "triton"]}}}))
    monkeypatch.setattr(_registry, "MEASURED_ORDER_FILE", table)
    _registry.clear_caches()
    assert _registry.priority("attention", "sm_90") == ("cuda", "triton", "torch")
    assert _registry.priority("attention", "sm_80") == ("triton", "cuda", "torch")  # never measured there
    assert _registry.priority("layer_norm", "sm_90") == ("triton", "cuda", "torch")


def test_inputs_are_validated_once_per_call(monkeypatch):
    from duodiff_fast.ops import norm
    calls = []
    real = norm.check_norm_inputs
    monkeypatch.setattr(norm, "check_norm_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ada = torch.randn(2, 48)
    ops.gated_adaln(x, u, ada[:, :8], ada[:, 8:16], ada[:, 16:24])
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------------
# Same verdict on every backend (torch and, under the interpreter, triton)
# ----------------------------------------------------------------------------------------------------

BACKENDS = ["torch"] + (["triton"] if INTERPRET or torch.cuda.is_available() else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_give_empty_results(backend):
    h = torch.randn(0, 5, 16, device=DEV)
    c = ops.exit_confidence(h, torch.randn(16, 2, device=DEV), torch.randn(2, device=DEV), 1, backend=backend)
    assert c.shape == (0,) and c.dtype == torch.float32
    qkv = torch.randn(0, 5, 3, 2, 32, device=DEV)
    assert ops.attention(qkv, backend=backend).shape == (0, 5, 64)
    x = torch.randn(0, 5, 16, device=DEV)
    assert ops.layer_norm(x, None, None, backend=backend).shape == (0, 5, 16)
    s = torch.randn(0, 16, device=DEV)
    r, y = ops.gated_adaln(x, x, s, s, s, backend=backend)
    assert r.shape == y.shape == (0, 5, 16)


def test_mixed_affine_dtypes_work_on_every_backend_and_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g).to(DEV)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(DEV, torch.float16)
    b = (0.1 * torch.randn(64, generator=g)).to(DEV, torch.float16)
    ref = ops.layer_norm_ref(x, w, b, upcast=True)
    for backend in BACKENDS:
        y = ops.layer_norm(x, w, b, backend=backend)
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().max() < 1e-5, backend
    xh = x.half()
    wf, bf = w.float(), b.float()
    for backend in BACKENDS:
        y = ops.layer_norm(xh, wf, bf, backend=backend)
        assert y.dtype == torch.float16 and (y.double() - ops.layer_norm_ref(xh, wf, bf, upcast=True)).abs().max() < 4e-3


@pytest.mark.parametrize("call,text", [
    (lambda: ops.layer_norm(torch.randn(2, 8), None, None, eps=-1.0), "eps"),
    (lambda: ops.layer_norm(torch.randn(2, 8), None, None, eps=float("nan")), "eps"),
    (lambda: ops.attention(torch.randn(1, 4, 3, 1, 32), scale=float("inf")), "scale"),
    (lambda: ops.exit_confidence(torch.randn(1, 4, 8), torch.randn(8, 0), torch.randn(0)), "K >= 1"),
    (lambda: ops.exit_confidence(torch.randn(1, 4, 8), torch.randn(8, 1), torch.randn(1), start=True), "start"),
    (lambda: ops.exit_confidence(torch.randn(1, 4, 8), torch.randn(8, 1), torch.randn(1), start=1.0), "start"),
    (lambda: ops.layer_norm(torch.randn(2, 8), None, None, backend=3), "backend"),
])
def test_bad_scalars_are_refused_before_dispatch(call, text):
    with pytest.raises(ValueError, match=text):
        call()


def test_numpy_integer_start_is_accepted():
    import numpy as np
    h, w, b = torch.randn(2, 5, 8), torch.randn(8, 1), torch.randn(1)
    assert torch.equal(ops.exit_confidence(h, w, b, np.int64(2)), ops.exit_confidence(h, w, b, 2))


def test_the_triton_kernel_takes_exactly_the_head_dims_the_op_declares():
    pytest.importorskip("triton")
    from duodiff_fast.kernels import attention as kernel
    from duodiff_fast.ops.attention import HEAD_DIMS
    assert set(kernel.HEAD_DIMS) == set(HEAD_DIMS)
    assert ops.IMPLS["attention"]["triton"].SUPPORTED_HEAD_DIMS == HEAD_DIMS


def test_compile_report_compiles_the_registry_kernel_modules():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "compile_report.py"
    spec = importlib.util.spec_from_file_location("compile_report_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.KERNEL_MODULES) == set(_registry.kernel_modules())

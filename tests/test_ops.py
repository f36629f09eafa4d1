"""Dispatch, validation, torch.library registration and correctness of duodiff_fast.ops.

Without a GPU the Triton backend runs under the interpreter (TRITON_INTERPRET=1, set by conftest.py and
again here before anything imports triton), at small shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from duodiff_fast import ops
from duodiff_fast.ops import _registry
from duodiff_fast.ops.numerics import assert_flash_rule

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Dot paths under the interpreter are tested in fp16/fp32 only (bf16 tl.dot is wrong there, DESIGN §6).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _kernels_present(*modules):
    missing = [m for m in modules if _registry.kernel_import_error(m, _fwd_name(m)) is not None]
    return pytest.mark.skipif(bool(missing), reason=f"kernel module(s) absent: {missing}")


def _fwd_name(module):
    # every Triton implementation names its kernel module and launcher (the registry's single record)
    impls = [c for c in (ops.IMPLS[op].get("triton") for op in ops.OPS) if c is not None]
    return {c.KERNEL_MODULE: c.LAUNCHER for c in impls}[module]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    _registry.clear_caches()
    yield
    _registry.clear_caches()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def assert_rule(name, out, ref64, same_dtype, dtype):
    """DESIGN §6 (duodiff_fast.ops.numerics): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol."""
    assert_flash_rule(name, out, ref64, same_dtype, dtype, ATOL[dtype])


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

def _inputs(dtype=torch.float32):
    g = _gen(1)
    x = _randn(2, 5, 32, dtype=dtype, gen=g)
    ada = _randn(2, 6 * 32, dtype=dtype, gen=g)  # (B, 6C): shift/scale/gate are strided chunks
    return {
        "attention": (_randn(2, 5, 3, 2, 32, dtype=dtype, gen=g),),
        "layer_norm": (x, _randn(32, gen=g), _randn(32, gen=g)),
        "add_layer_norm": (x, _randn(2, 5, 32, dtype=dtype, gen=g), _randn(32, gen=g), _randn(32, gen=g)),
        "adaln": (x, ada[:, :32], ada[:, 32:64]),
        "gated_adaln": (x, _randn(2, 5, 32, dtype=dtype, gen=g), ada[:, 64:96], ada[:, :32], ada[:, 32:64]),
        "exit_confidence": (x, _randn(32, 3, gen=g), _randn(3, gen=g)),
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch")
def test_cpu_without_interpreter_picks_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op, args in _inputs().items():
        assert ops.select_backend(op, *args) == "torch", op
        why = ops.explain(op, *args)["reasons"]
        assert why["torch"] == []
        assert any("needs CUDA tensors" in r for r in why["triton"]), why["triton"]
        assert any("_C" in r for r in why["cuda"]), why["cuda"]


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch")
def test_forced_triton_without_gpu_or_interpreter_raises_with_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _inputs()["adaln"]
    with pytest.raises(ValueError, match="backend 'triton' was forced") as e:
        ops.adaln(*args, backend="triton")
    assert "needs CUDA tensors" in str(e.value) and "TRITON_INTERPRET=1" in str(e.value)
    with pytest.raises(ValueError, match="_C is not built"):
        ops.attention(*_inputs()["attention"], backend="cuda")


@pytest.mark.skipif(not INTERPRET, reason="needs the Triton interpreter")
@_kernels_present("attention", "norm", "exit_confidence")
def test_interpreter_runs_only_when_forced_on_cpu():
    # The interpreter is a correctness tool (10-100x slower than torch): never an automatic choice.
    for op, args in _inputs().items():
        assert ops.select_backend(op, *args) == "torch", ops.explain(op, *args)
        assert ops.select_backend(op, *args, backend="triton") == "triton"


def test_env_var_forces_and_per_call_overrides(monkeypatch):
    args = _inputs()["layer_norm"]
    monkeypatch.setenv("DUODIFF_BACKEND", "torch")
    assert ops.select_backend("layer_norm", *args) == "torch"
    assert ops.select_backend("attention", *_inputs()["attention"]) == "torch"
    monkeypatch.setenv("DUODIFF_BACKEND", "triton")
    if INTERPRET or DEVICE == "cuda":
        assert ops.select_backend("layer_norm", *args) == "triton"
    x64 = args[0].double()  # fp64 is a dtype no fast kernel takes
    with pytest.raises(ValueError, match=r"forced \(DUODIFF_BACKEND=triton\)(.|\n)*dtype torch.float64"):
        ops.layer_norm(x64, *args[1:])
    # a per-call choice wins over the environment; 'auto' restores automatic dispatch
    assert ops.select_backend("layer_norm", x64, *args[1:], backend="torch") == "torch"
    assert ops.select_backend("layer_norm", x64, *args[1:], backend="auto") == "torch"
    monkeypatch.setenv("DUODIFF_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ops.layer_norm(*args)


def test_sdpa_is_an_attention_backend_only():
    qkv = _inputs()["attention"][0]
    assert ops.select_backend("attention", qkv, backend="sdpa") == "torch"
    torch.testing.assert_close(ops.attention(qkv, backend="sdpa"), ops.attention_sdpa(qkv), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'sdpa' .* attention only"):
        ops.layer_norm(*_inputs()["layer_norm"], backend="sdpa")


def test_absent_kernel_falls_back_quietly_and_forced_names_it(monkeypatch):
    monkeypatch.setattr(ops.IMPLS["attention"]["triton"], "KERNEL_MODULE", "no_such_kernel")
    qkv = _inputs()["attention"][0]
    assert ops.select_backend("attention", qkv) != "triton"
    with pytest.raises(ValueError, match="duodiff_fast.kernels.no_such_kernel is not importable"):
        ops.attention(qkv, backend="triton")


def test_grad_goes_to_torch():
    x, w, b = _inputs()["layer_norm"]
    x = x.clone().requires_grad_()
    assert ops.select_backend("layer_norm", x, w, b) == "torch"
    y = ops.layer_norm(x, w, b)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"inference only, but x require\(s\) grad"):
        ops.layer_norm(x, w, b, backend="triton")
    with torch.no_grad():  # grad mode off: requires_grad no longer matters
        assert ops.select_backend("layer_norm", x, w, b) == ops.select_backend("layer_norm", x.detach(), w, b)


@pytest.mark.skipif(not INTERPRET, reason="needs the Triton interpreter")
def test_interpreter_refuses_bf16_attention():
    qkv = _inputs(torch.bfloat16)["attention"][0]
    assert ops.select_backend("attention", qkv) == "torch"
    with pytest.raises(ValueError, match="bf16 tl.dot"):
        ops.attention(qkv, backend="triton")


def test_head_dim_and_dtype_declared_per_backend():
    g = _gen(2)
    qkv = _randn(1, 3, 3, 1, 40, gen=g)  # D = 40 is not a kernel head dim; SDPA takes it
    why = ops.explain("attention", qkv)
    assert any("head dim 40 not supported" in r for r in why["reasons"]["triton"])
    assert why["chosen"] == "torch"
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g).to(DEVICE)
    why = ops.explain("layer_norm", x, None, None)
    assert any("dtype torch.float64 not supported" in r for r in why["reasons"]["triton"])
    assert ops.layer_norm(x, None, None).dtype == torch.float64


def test_non_contiguous_last_dim_goes_to_torch():
    g = _gen(3)
    x = _randn(2, 16, 5, gen=g).transpose(1, 2)  # (2, 5, 16) with last-dim stride 5
    w, b = _randn(16, gen=g), _randn(16, gen=g)
    why = ops.explain("layer_norm", x, w, b)
    assert any("last dim of x is not contiguous" in r for r in why["reasons"]["triton"])
    torch.testing.assert_close(ops.layer_norm(x, w, b), ops.layer_norm_ref(x, w, b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Validation: errors name the argument and the problem
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda a: ops.attention(a["attention"][0][:, :, 0]), r"qkv must be \[B, L, 3, H, D\]"),
    (lambda a: ops.attention(a["attention"][0].to(torch.int32)), "qkv must be a floating-point tensor"),
    (lambda a: ops.attention(a["attention"][0].transpose(-1, -2)), "last dim of qkv must be contiguous"),
    (lambda a: ops.attention(a["attention"][0], scale=-0.1), "scale must be a positive number"),
    (lambda a: ops.layer_norm(a["layer_norm"][0], a["layer_norm"][1][:16], None), r"weight must be .*\[32\]"),
    (lambda a: ops.add_layer_norm(a["add_layer_norm"][0], a["add_layer_norm"][1][:, :4], None, None),
     "update must be .* x's shape"),
    (lambda a: ops.add_layer_norm(a["add_layer_norm"][0], a["add_layer_norm"][1].double(), None, None),
     "update dtype torch.float64 differs"),
    (lambda a: ops.adaln(a["adaln"][0], a["adaln"][1][:1], a["adaln"][2]), r"shift must be .*\[2, 32\]"),
    (lambda a: ops.adaln(a["adaln"][0][None], a["adaln"][1], a["adaln"][2]), r"x must be \[B, L, C\]"),
    (lambda a: ops.gated_adaln(*a["gated_adaln"][:2], a["gated_adaln"][2].t(), *a["gated_adaln"][3:]),
     "gate must be"),
    (lambda a: ops.exit_confidence(a["exit_confidence"][0], a["exit_confidence"][1].t(),
                                   a["exit_confidence"][2]), r"weight must be .*\[C, K\].*pass its \.t\(\)"),
    (lambda a: ops.exit_confidence(*a["exit_confidence"], start=5), r"start must be an int in \[0, L\)"),
    (lambda a: ops.exit_confidence(a["exit_confidence"][0], a["exit_confidence"][1],
                                   a["exit_confidence"][2][:1]), r"bias must be .*\[3\]"),
])
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(_inputs())


def test_unknown_op_in_select_backend():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        ops.select_backend("softmax", torch.randn(2))


# --------------------------------------------------------------------------------------------------
# Triton backend matches the float64 reference (interpreter on CPU, real kernels on a GPU)
# --------------------------------------------------------------------------------------------------

@_kernels_present("attention")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, L, H, D, strided", [(1, 1, 1, 32, False), (3, 17, 2, 72, True)])
def test_attention_triton_matches_ref(B, L, H, D, strided, dtype):
    g = _gen(10)
    if strided:  # heads padded in memory: a view with last dim contiguous but no dense layout
        qkv = _randn(B, L, 3, H, D + 8, dtype=dtype, gen=g)[..., :D]
    else:
        qkv = _randn(B, L, 3, H, D, dtype=dtype, gen=g)
    out = ops.attention(qkv, backend="triton")
    assert out.dtype == dtype and out.shape == (B, L, H * D)
    assert_rule("attention", out, ops.attention_ref(qkv, upcast=True), ops.attention(qkv, backend="torch"),
                dtype)
    scaled = ops.attention(qkv, scale=0.3, backend="triton")
    assert_rule("attention(scale=0.3)", scaled, ops.attention_ref(qkv, 0.3, upcast=True),
                ops.attention(qkv, scale=0.3, backend="torch"), dtype)


def _norm_case(shape, dtype, seed, strided):
    g = _gen(seed)
    C = shape[-1]
    if strided:  # rows strided in memory (a slice of a wider buffer), last dim contiguous
        x = _randn(*shape[:-1], C + 16, dtype=dtype, gen=g)[..., 8:8 + C]
    else:
        x = _randn(*shape, dtype=dtype, gen=g)
    u = _randn(*shape, dtype=dtype, gen=g)
    w, b = 1 + 0.1 * _randn(C, gen=g), 0.1 * _randn(C, gen=g)
    ada = _randn(shape[0], 6 * C, dtype=dtype, gen=g)  # DiT's adaLN Linear output, chunked
    return x, u, w, b, ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]


NORM_CASES = [((3, 17, 64), False), ((2, 5, 72), True), ((5, 96), False)]


@_kernels_present("norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, strided", NORM_CASES)
def test_norm_family_triton_matches_ref(shape, strided, dtype):
    x, u, w, b, shift, scale, gate = _norm_case(shape, dtype, 20, strided)

    y = ops.layer_norm(x, w, b, backend="triton")
    assert_rule("layer_norm", y, ops.layer_norm_ref(x, w, b, upcast=True),
                ops.layer_norm(x, w, b, backend="torch"), dtype)

    r, y = ops.add_layer_norm(x, u, w, b, backend="triton")
    r64, y64 = ops.add_layer_norm_ref(x, u, w, b, upcast=True)
    rt, yt = ops.add_layer_norm(x, u, w, b, backend="torch")
    assert_rule("add_layer_norm.residual", r, r64, rt, dtype)
    assert_rule("add_layer_norm.y", y, y64, yt, dtype)

    y = ops.adaln(x, shift, scale, backend="triton")
    assert_rule("adaln", y, ops.adaln_ref(x, shift, scale, upcast=True),
                ops.adaln(x, shift, scale, backend="torch"), dtype)
    y = ops.adaln(x, shift, scale, 1e-5, w, b, backend="triton")
    assert_rule("adaln(affine)", y, ops.adaln_ref(x, shift, scale, 1e-5, w, b, upcast=True),
                ops.adaln(x, shift, scale, 1e-5, w, b, backend="torch"), dtype)

    r, y = ops.gated_adaln(x, u, gate, shift, scale, backend="triton")
    r64, y64 = ops.gated_adaln_ref(x, u, gate, shift, scale, upcast=True)
    rt, yt = ops.gated_adaln(x, u, gate, shift, scale, backend="torch")
    assert_rule("gated_adaln.residual", r, r64, rt, dtype)
    assert_rule("gated_adaln.y", y, y64, yt, dtype)


@_kernels_present("norm")
def test_layer_norm_triton_folds_leading_dims():
    g = _gen(21)
    x, w, b = _randn(2, 3, 4, 32, gen=g), _randn(32, gen=g), _randn(32, gen=g)  # 4-D: folded to [24, 32]
    y = ops.layer_norm(x, w, b, backend="triton")
    assert_rule("layer_norm(4-D)", y, ops.layer_norm_ref(x, w, b, upcast=True),
                ops.layer_norm(x, w, b, backend="torch"), torch.float32)


@_kernels_present("exit_confidence")
@pytest.mark.parametrize("dtype", DTYPES + ([torch.bfloat16] if DEVICE == "cpu" else []), ids=str)
@pytest.mark.parametrize("B, L, C, K, start", [(1, 1, 64, 1, 0), (3, 17, 96, 5, 1)])
def test_exit_confidence_triton_matches_ref(B, L, C, K, start, dtype):
    g = _gen(30)
    h = _randn(B, L, C, dtype=dtype, gen=g)
    w, b = (0.2 * _randn(C, K, gen=g)).to(dtype), _randn(K, gen=g).to(dtype)
    out = ops.exit_confidence(h, w, b, start, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (B,)
    # fp32 output either way; 16-bit inputs get the fp16 allowance for the products the kernel rounds
    tol_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    assert_rule("exit_confidence", out, ops.exit_confidence_ref(h, w, b, start, upcast=True),
                ops.exit_confidence(h, w, b, start, backend="torch"), tol_dtype)


# --------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile(fullgraph=True) and fake tensors
# --------------------------------------------------------------------------------------------------

def _chain(qkv, x, u, w, b, shift, scale, gate, wk, bk, backend):
    """Every op once, as a DiT/U-ViT block would chain them."""
    a = ops.attention(qkv, backend=backend)  # (B, L, H*D) = (B, L, C)
    y = ops.layer_norm(a, w, b, backend=backend)
    r, y = ops.add_layer_norm(x, y, w, b, backend=backend)
    y = ops.adaln(y, shift, scale, backend=backend)
    r, y = ops.gated_adaln(r, y, gate, shift, scale, backend=backend)
    return r, y, ops.exit_confidence(y, wk, bk, 1, backend=backend)


def _chain_inputs():
    g = _gen(40)
    x, u, w, b, shift, scale, gate = _norm_case((2, 9, 64), torch.float32, 41, False)
    return (_randn(2, 9, 3, 2, 32, gen=g), x, u, w, b, shift, scale, gate, _randn(64, 3, gen=g),
            _randn(3, gen=g))


def _compile_and_compare(backend, compile_backend):
    torch._dynamo.reset()
    args = _chain_inputs()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        if compile_backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(lambda *a: _chain(*a, backend), fullgraph=True, backend=recording)
    got = compiled(*args)
    want = _chain(*args, backend)
    for name, o, e in zip(("residual", "y", "confidence"), got, want):
        err = (o - e).abs()
        print(f"compiled vs eager {name}: max {err.max().item():.3e}, mean {err.mean().item():.3e}")
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    return targets


@_kernels_present("attention", "norm", "exit_confidence")
@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or the Triton interpreter")
def test_compile_fullgraph_triton_ops():
    # Inductor is the default compile backend: it must accept the opaque ops (fake impls, strides).
    targets = _compile_and_compare("triton", "inductor")
    for op in ops.OPS:
        assert f"duodiff.{op}.default" in targets, (op, targets)


def test_compile_fullgraph_torch_path():
    # aot_eager: Inductor's C++ codegen of the plain-torch graph takes ~40 s on a 2-core CPU.
    targets = _compile_and_compare("torch", "aot_eager")
    assert not any(t.startswith("duodiff.") for t in targets), targets


def test_dispatch_marks_selection_constant_like_torch_does():
    # _dispatch sets Dynamo's marker itself so that importing the ops does not import torch._dynamo;
    # if a torch upgrade changes the mechanism, this fails before torch.compile silently traces into it.
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert marked._dynamo_marked_constant is True
    assert _registry._select._dynamo_marked_constant is True


@_kernels_present("attention", "norm", "exit_confidence")
@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or the Triton interpreter")
def test_fake_tensor_mode_uses_the_registered_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 7, 3, 4, 32, device=DEVICE)
        out = ops.attention(qkv, backend="triton")
        x, s = torch.empty(2, 7, 128, device=DEVICE), torch.empty(2, 128, device=DEVICE)
        r, y = ops.gated_adaln(x, x, s, s, s, backend="triton")
        wk, bk = torch.empty(128, 4, device=DEVICE), torch.empty(4, device=DEVICE)
        c = ops.exit_confidence(y, wk, bk, backend="triton")
    assert out.shape == (2, 7, 128) and r.shape == y.shape == (2, 7, 128)
    assert c.shape == (2,) and c.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# GPU only: CUDA-graph capture of every fast op
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_graph_capture_replays_exactly(backend):
    args = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in _chain_inputs()]
    args = [a.cuda() for a in args]
    want = _chain(*args, backend)  # also autotunes before the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(*args, backend)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(g):
        outs = _chain(*args, backend)
    for o in outs:
        o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, want):
        torch.testing.assert_close(o, e, rtol=0, atol=0)

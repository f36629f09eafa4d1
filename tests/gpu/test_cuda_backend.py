"""The compiled CUDA backend (duodiff_fast._C, csrc/) on a GPU: every op against the float64 reference
(DESIGN §6 rule) and against the Triton kernels, on the DESIGN §6 shapes; CUDA-graph capture per op
(capture, poison the output, replay, compare exactly); binding errors; build metadata.

GPU-only (marked `gpu`, skipped cleanly without one). On a GPU machine the extension is taken from
`pip install -e . --no-build-isolation` or JIT-built on first use; if neither works the tests fail
with the reason (set DUODIFF_SKIP_CUDA_BUILD=1 to skip them instead). Written to validate the kernels
in one GPU session: the CPU suite only runs them in the emulator (tests/test_csrc.py).
"""
import math
import os
import zlib

import pytest
import torch

from duodiff_fast.ops.numerics import assert_flash_rule

from duodiff_fast import _cpp_lib, ops
from duodiff_fast.ops.attention import attention_ref
from duodiff_fast.ops.exit_confidence import exit_confidence_ref
from duodiff_fast.ops.norm import adaln_ref, add_layer_norm_ref, gated_adaln_ref, layer_norm_ref

pytestmark = pytest.mark.gpu

DEV = "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]


def _ids(d):
    return str(d).replace("torch.", "")


@pytest.fixture(scope="module")
def C():
    if os.environ.get("DUODIFF_SKIP_CUDA_BUILD", "0") == "1" and not _cpp_lib.is_available():
        pytest.skip("DUODIFF_SKIP_CUDA_BUILD=1 and duodiff_fast._C is not built")
    try:
        return _cpp_lib.get()
    except _cpp_lib.ExtensionError as e:
        pytest.fail(f"duodiff_fast._C is not usable on this GPU machine: {e}\n{_cpp_lib.status()}")


def _gen(*key):
    return torch.Generator(device=DEV).manual_seed(zlib.crc32(repr(key).encode()))


def _randn(*shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32) * scale + offset).to(dtype)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


def assert_close_to_ref(name, out, ref64, same_dtype, atol):
    """DESIGN §6 (duodiff_fast.ops.numerics): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol,
    every element written."""
    r = assert_flash_rule(name, out, ref64, same_dtype, atol=atol)
    return r["max_err"], r["bound"]


# ==================================================================================================
# Attention
# ==================================================================================================

HEAD_DIMS = [32, 48, 64, 72, 80, 96, 128]
SEQ_LENS = [1, 17, 257, 258, 1026]


def _attention_check(C, qkv, scale=None, out=None, name="", against_triton=True):
    B, L, _, H, D = qkv.shape
    scale = D**-0.5 if scale is None else scale
    out = _nan(B, L, H * D, dtype=qkv.dtype) if out is None else out.fill_(float("nan"))
    C.attention(qkv, scale, out)
    ref64 = attention_ref(qkv, scale, upcast=True)
    same = ops.attention(qkv, scale, backend="torch")  # SDPA in the input dtype
    tag = f"attention[{B},{L},{H},{D},{_ids(qkv.dtype)}]{name}"
    _, bound = assert_close_to_ref(tag, out, ref64, same, ATOL[qkv.dtype])
    if against_triton:
        from duodiff_fast.kernels.attention import attention_fwd

        tri = attention_fwd(qkv, scale)
        _, tbound = assert_close_to_ref(tag + ".triton", tri, ref64, same, ATOL[qkv.dtype])
        diff = (out.double() - tri.double()).abs().max().item()
        print(f"{tag}: |cuda - triton| max {diff:.3e}")
        assert diff <= bound + tbound, f"{tag}: cuda and triton differ by {diff:.3e} > {bound + tbound:.3e}"
    return out


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_attention_matches_reference_and_triton(C, dtype, L, D):
    B, H = (3, 2) if L <= 258 else (1, 2)
    qkv = _randn(B, L, 3, H, D, dtype=dtype, gen=_gen("a", L, D, _ids(dtype)), scale=1.5)
    # Triton autotunes per (L, D, dtype), seconds each: cross-check at L = 257 (every D) and 1026 (D = 64)
    _attention_check(C, qkv, against_triton=L == 257 or (L == 1026 and D == 64))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_attention_strided_views_and_explicit_scale(C, dtype):
    B, L, H, D = 2, 257, 4, 72
    # qkv as a view of a Linear output with padded rows; out a column slice of a wider buffer
    wide = _randn(B, L, 3 * H * D + 24, dtype=dtype, gen=_gen("as", _ids(dtype)))
    qkv = wide[:, :, 8:8 + 3 * H * D].view(B, L, 3, H, D)
    buf = _nan(B, L, H * D + 16, dtype=dtype)
    out = buf[:, :, 8:8 + H * D]
    _attention_check(C, qkv, scale=0.2, out=out, name=".strided")
    assert torch.isnan(buf[:, :, :8]).all() and torch.isnan(buf[:, :, 8 + H * D:]).all()
    # misaligned views (odd element offsets) are copied by the binding: still right
    odd = _randn(B, L, 3 * H * D + 1, dtype=dtype, gen=_gen("odd"))[:, :, 1:].reshape(B, L, 3, H, D)
    _attention_check(C, odd, name=".misaligned", against_triton=False)


def test_attention_grid_beyond_65535_heads(C):
    # B * H = 70,400 CTAs along x (the y / z limit is 65,535)
    qkv = _randn(1100, 5, 3, 64, 32, dtype=torch.float16, gen=_gen("big"))
    _attention_check(C, qkv, against_triton=False, name=".bh70400")


def test_attention_large_scores(C):
    qkv = _randn(2, 300, 3, 2, 64, dtype=torch.bfloat16, gen=_gen("large"), scale=4.0)
    _attention_check(C, qkv, scale=1.0, name=".large")


def test_attention_through_the_op_registry(C):
    qkv = _randn(2, 257, 3, 4, 64, dtype=torch.bfloat16, gen=_gen("op"))
    with torch.no_grad():
        out = ops.attention(qkv, backend="cuda")
    assert_close_to_ref("ops.attention[cuda]", out, attention_ref(qkv, upcast=True),
                        ops.attention(qkv, backend="torch"), ATOL[torch.bfloat16])


# ==================================================================================================
# Norm family
# ==================================================================================================

def _rows(B, L, C_, layout, dtype, gen, scale=1.0, offset=0.0):
    if layout == "contig":
        return _randn(B, L, C_, dtype=dtype, gen=gen, scale=scale, offset=offset)
    if layout == "wide":
        return _randn(B, L, C_ + 24, dtype=dtype, gen=gen, scale=scale, offset=offset)[..., 8:8 + C_]
    if layout == "slice":
        return _randn(B, L + 1, C_, dtype=dtype, gen=gen, scale=scale, offset=offset)[:, 1:]
    if layout == "odd":  # not 16-byte aligned: the scalar path
        return _randn(B, L, C_ + 1, dtype=dtype, gen=gen, scale=scale, offset=offset)[..., 1:]
    raise ValueError(layout)


def _norm_case(C, op, B, L, C_, layout, dtype, mod_dtype=None):
    gen = _gen("n", op, B, L, C_, layout, _ids(dtype), str(mod_dtype))
    mod_dtype = mod_dtype or dtype
    x = _rows(B, L, C_, layout, dtype, gen, scale=2.0, offset=0.5)
    u = _rows(B, L, C_, layout, dtype, gen)
    w = _randn(C_, dtype=mod_dtype, gen=gen, scale=0.5, offset=1.0)
    bias = _randn(C_, dtype=mod_dtype, gen=gen, scale=0.5)
    ada = _randn(B, 6 * C_, dtype=mod_dtype, gen=gen, scale=0.5)
    shift, scale, gate = ada[:, :C_], ada[:, C_:2 * C_], ada[:, 2 * C_:3 * C_]
    y, r = _nan(B, L, C_, dtype=dtype), _nan(B, L, C_, dtype=dtype)
    tag = f"{op}[{B},{L},{C_},{layout},{_ids(dtype)},{_ids(mod_dtype)}]"
    if op == "layer_norm":
        C.norm(x, w, bias, None, None, None, None, 1e-5, y, None)
        checks = [("y", y, layer_norm_ref(x, w, bias, 1e-5, upcast=True), layer_norm_ref(x, w, bias, 1e-5))]
        tri = ops.layer_norm(x, w, bias, 1e-5, backend="triton")
        checks_tri = [("y", tri)]
    elif op == "add_layer_norm":
        C.norm(x, w, bias, u, None, None, None, 1e-5, y, r)
        r64, y64 = add_layer_norm_ref(x, u, w, bias, 1e-5, upcast=True)
        r_t, y_t = add_layer_norm_ref(x, u, w, bias, 1e-5)
        checks = [("r", r, r64, r_t), ("y", y, y64, y_t)]
        checks_tri = list(zip(("r", "y"), ops.add_layer_norm(x, u, w, bias, 1e-5, backend="triton")))
    elif op == "adaln":
        C.norm(x, None, None, None, None, shift, scale, 1e-6, y, None)
        checks = [("y", y, adaln_ref(x, shift, scale, 1e-6, upcast=True), adaln_ref(x, shift, scale, 1e-6))]
        checks_tri = [("y", ops.adaln(x, shift, scale, 1e-6, backend="triton"))]
    elif op == "adaln_affine":
        C.norm(x, w, bias, None, None, shift, scale, 1e-6, y, None)
        checks = [("y", y, adaln_ref(x, shift, scale, 1e-6, w, bias, upcast=True),
                   adaln_ref(x, shift, scale, 1e-6, w, bias))]
        checks_tri = [("y", ops.adaln(x, shift, scale, 1e-6, w, bias, backend="triton"))]
    elif op == "gated_adaln":
        C.norm(x, None, None, u, gate, shift, scale, 1e-6, y, r)
        r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, 1e-6, upcast=True)
        r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale, 1e-6)
        checks = [("r", r, r64, r_t), ("y", y, y64, y_t)]
        checks_tri = list(zip(("r", "y"), ops.gated_adaln(x, u, gate, shift, scale, 1e-6, backend="triton")))
    else:
        raise ValueError(op)
    tri = dict(checks_tri)
    for what, out, ref64, same in checks:
        _, bound = assert_close_to_ref(f"{tag}.{what}", out, ref64, same, ATOL[dtype])
        _, tbound = assert_close_to_ref(f"{tag}.{what}.triton", tri[what], ref64, same, ATOL[dtype])
        diff = (out.double() - tri[what].double()).abs().max().item()
        assert diff <= bound + tbound, f"{tag}.{what}: cuda and triton differ by {diff:.3e}"


NORM_OPS = ["layer_norm", "add_layer_norm", "adaln", "adaln_affine", "gated_adaln"]
NORM_SHAPES = [(1, 1, 64, "contig"), (3, 17, 72, "wide"), (1, 257, 96, "slice"), (3, 257, 64, "wide"),
               (3, 17, 1152, "slice"), (2, 258, 4096, "contig"), (3, 5, 72, "odd"), (2, 3, 70, "contig")]


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize("B,L,C_,layout", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_matches_reference_and_triton(C, op, B, L, C_, layout, dtype):
    _norm_case(C, op, B, L, C_, layout, dtype)


@pytest.mark.parametrize("C_", [256, 512, 1024, 2048, 16384, 20000])
def test_norm_every_launch_shape(C, C_):
    # rows of 32 lanes, 1 / 2 / 4 vectors per lane, 2 / 4 / 16 warps per row, then the scalar path
    _norm_case(C, "gated_adaln", 2, 3, C_, "contig", torch.bfloat16)


def test_norm_mixed_precision_and_in_place(C):
    _norm_case(C, "gated_adaln", 3, 17, 72, "contig", torch.bfloat16, mod_dtype=torch.float32)
    _norm_case(C, "adaln_affine", 2, 9, 1152, "contig", torch.float16, mod_dtype=torch.float32)
    gen = _gen("inplace")
    B, L, C_ = 3, 17, 96
    x = _rows(B, L, C_, "wide", torch.float16, gen, scale=2.0)
    u = _rows(B, L, C_, "wide", torch.float16, gen)
    ada = _randn(B, 6 * C_, dtype=torch.float16, gen=gen, scale=0.5)
    shift, scale, gate = ada[:, :C_], ada[:, C_:2 * C_], ada[:, 2 * C_:3 * C_]
    r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, 1e-6, upcast=True)
    r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale, 1e-6)
    y = _nan(B, L, C_, dtype=torch.float16)
    C.norm(x, None, None, u, gate, shift, scale, 1e-6, y, x)  # residual_out = x
    assert_close_to_ref("in_place.r", x, r64, r_t, ATOL[torch.float16])
    assert_close_to_ref("in_place.y", y, y64, y_t, ATOL[torch.float16])


def test_norm_two_dim_and_four_dim_rows(C):
    gen = _gen("nd")
    x2 = _randn(37, 96, dtype=torch.bfloat16, gen=gen)
    w, b = _randn(96, dtype=torch.bfloat16, gen=gen), _randn(96, dtype=torch.bfloat16, gen=gen)
    y2 = _nan(37, 96, dtype=torch.bfloat16)
    C.norm(x2, w, b, None, None, None, None, 1e-5, y2, None)
    assert_close_to_ref("ln2d", y2, layer_norm_ref(x2, w, b, upcast=True), layer_norm_ref(x2, w, b), 1e-2)
    x4 = _randn(2, 3, 5, 64, dtype=torch.float16, gen=gen).transpose(1, 2)  # not viewable as rows
    y4 = _nan(2, 5, 3, 64, dtype=torch.float16)
    w4, b4 = _randn(64, dtype=torch.float16, gen=gen), _randn(64, dtype=torch.float16, gen=gen)
    C.norm(x4, w4, b4, None, None, None, None, 1e-5, y4, None)
    assert_close_to_ref("ln4d", y4, layer_norm_ref(x4, w4, b4, upcast=True), layer_norm_ref(x4, w4, b4), 1e-3)


# ==================================================================================================
# Exit confidence
# ==================================================================================================

def _exit_inputs(B, L, C_, K, dtype, w_dtype, layout, gen, transposed=True):
    if layout == "contig":
        h = _randn(B, L, C_, dtype=dtype, gen=gen, scale=1.5, offset=0.2)
    else:
        h = _randn(B, L + 1, C_ + 16, dtype=dtype, gen=gen, scale=1.5, offset=0.2)[:, 1:, 8:8 + C_]
    if transposed:
        weight = _randn(K, C_, dtype=w_dtype, gen=gen, scale=C_**-0.5).t()
    else:
        weight = _randn(C_, K, dtype=w_dtype, gen=gen, scale=C_**-0.5)
    return h, weight, _randn(K, dtype=w_dtype, gen=gen, scale=0.5)


def _exit_check(C, h, weight, bias, start, name):
    out = _nan(h.shape[0], dtype=torch.float32)
    C.exit_confidence(h, weight, bias, start, out)
    ref64 = exit_confidence_ref(h, weight, bias, start, upcast=True)
    same = exit_confidence_ref(h, weight, bias, start)
    _, bound = assert_close_to_ref(name, out, ref64, same, 1e-5)
    tri = ops.exit_confidence(h, weight, bias, start, backend="triton")
    _, tbound = assert_close_to_ref(name + ".triton", tri, ref64, same, 1e-4)
    assert (out.double() - tri.double()).abs().max().item() <= bound + tbound
    return out


EXIT_SHAPES = [(1, 1, 64, "contig"), (3, 17, 1152, "strided"), (3, 17, 72, "contig"), (1, 258, 96, "strided"),
               (4, 257, 512, "contig")]


@pytest.mark.parametrize("dtype", ALL, ids=_ids)
@pytest.mark.parametrize("K", [1, 12, 33, 130])
@pytest.mark.parametrize("B,L,C_,layout", EXIT_SHAPES, ids=str)
def test_exit_confidence_matches_reference_and_triton(C, B, L, C_, layout, K, dtype):
    for start in (0, 2):
        if start >= L:
            continue
        h, w, b = _exit_inputs(B, L, C_, K, dtype, dtype, layout, _gen("e", B, L, C_, K, _ids(dtype), start))
        _exit_check(C, h, w, b, start, f"exit[{B},{L},{C_},{layout},K={K},{_ids(dtype)},start={start}]")


@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_exit_confidence_mixed_dtypes_and_plain_weight(C, dtype, w_dtype):
    h, w, b = _exit_inputs(2, 50, 256, 12, dtype, w_dtype, "contig", _gen("mix", _ids(dtype)), transposed=False)
    _exit_check(C, h, w, b, 1, f"exit_mixed[{_ids(dtype)},{_ids(w_dtype)}]")


@pytest.mark.parametrize("K", [1, 12])
def test_exit_confidence_is_deterministic_and_batch_independent(C, K):
    h, w, b = _exit_inputs(64, 257, 512, K, torch.bfloat16, torch.bfloat16, "contig", _gen("det", K))
    out = torch.empty(64, device=DEV)
    C.exit_confidence(h, w, b, 1, out)
    again = torch.empty(64, device=DEV)
    C.exit_confidence(h, w, b, 1, again)
    assert torch.equal(out, again)
    for lo, hi in ((0, 1), (5, 8), (63, 64)):
        part = torch.empty(hi - lo, device=DEV)
        C.exit_confidence(h[lo:hi].contiguous(), w, b, 1, part)
        assert torch.equal(part, out[lo:hi]), (lo, hi)


# ==================================================================================================
# CUDA graphs: capture, poison the output, replay, compare exactly
# ==================================================================================================

def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm up (and JIT / first-launch work) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _replay_matches(g, outputs, expected):
    for o in outputs:
        o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for o, e in zip(outputs, expected):
        assert torch.equal(o, e), (o - e).abs().max()


def test_graph_capture_attention(C):
    qkv = _randn(2, 257, 3, 4, 72, dtype=torch.bfloat16, gen=_gen("g-a"))
    out = torch.empty(2, 257, 288, device=DEV, dtype=torch.bfloat16)
    g = _capture(lambda: C.attention(qkv, 72**-0.5, out))
    expected = out.clone()
    _replay_matches(g, [out], [expected])
    assert_close_to_ref("graph.attention", out, attention_ref(qkv, upcast=True),
                        ops.attention(qkv, backend="torch"), ATOL[torch.bfloat16])


def test_graph_capture_norm(C):
    gen = _gen("g-n")
    B, L, C_ = 3, 257, 1152
    x, u = _randn(B, L, C_, dtype=torch.bfloat16, gen=gen), _randn(B, L, C_, dtype=torch.bfloat16, gen=gen)
    ada = _randn(B, 6 * C_, dtype=torch.bfloat16, gen=gen, scale=0.5)
    shift, scale, gate = ada[:, :C_], ada[:, C_:2 * C_], ada[:, 2 * C_:3 * C_]
    y, r = torch.empty_like(x), torch.empty_like(x)
    g = _capture(lambda: C.norm(x, None, None, u, gate, shift, scale, 1e-6, y, r))
    ey, er = y.clone(), r.clone()
    _replay_matches(g, [y, r], [ey, er])
    # fp16 modulation for bf16 rows is converted to fp32 inside the binding: the copies are captured too
    shift16, scale16 = shift.half(), scale.half()
    y2 = torch.empty_like(x)
    g2 = _capture(lambda: C.norm(x, None, None, None, None, shift16, scale16, 1e-6, y2, None))
    _replay_matches(g2, [y2], [y2.clone()])


def test_graph_capture_exit_confidence(C):
    for K in (1, 12):
        h, w, b = _exit_inputs(8, 257, 512, K, torch.bfloat16, torch.bfloat16, "contig", _gen("g-e", K),
                               transposed=False)  # [C, K] row-major: the binding transposes a copy
        out = torch.empty(8, device=DEV)
        g = _capture(lambda h=h, w=w, b=b, out=out: C.exit_confidence(h, w, b, 1, out))
        _replay_matches(g, [out], [out.clone()])


def test_graph_capture_through_the_ops(C):
    qkv = _randn(2, 258, 3, 4, 64, dtype=torch.float16, gen=_gen("g-o"))
    x = _randn(2, 258, 256, dtype=torch.float16, gen=_gen("g-o2"))
    res = {}

    def run():
        with torch.no_grad():
            res["a"] = ops.attention(qkv, backend="cuda")
            res["n"] = ops.layer_norm(x, None, None, 1e-5, backend="cuda")
            res["e"] = ops.exit_confidence(x, torch.ones(256, 1, device=DEV, dtype=torch.float16) / 256,
                                           torch.zeros(1, device=DEV, dtype=torch.float16), 0, backend="cuda")

    g = _capture(run)
    expected = [res[k].clone() for k in "ane"]
    _replay_matches(g, [res[k] for k in "ane"], expected)


# ==================================================================================================
# Binding errors and build metadata
# ==================================================================================================

def test_binding_errors_name_the_argument(C):
    qkv = _randn(1, 8, 3, 2, 64, dtype=torch.float16, gen=_gen("err"))
    out = torch.empty(1, 8, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"qkv has dtype Float; the cuda backend takes float16 or bfloat16"):
        C.attention(qkv.float(), 0.1, out.float())
    with pytest.raises(RuntimeError, match=r"head dim D = 40 is not supported"):
        C.attention(qkv[..., :40], 0.1, torch.empty(1, 8, 80, device=DEV, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"out must be \[B, L, H\*D\]"):
        C.attention(qkv, 0.1, out[:, :, :64])
    with pytest.raises(RuntimeError, match="qkv must be a CUDA tensor"):
        C.attention(qkv.cpu(), 0.1, out)
    with pytest.raises(RuntimeError, match="scale must be a positive"):
        C.attention(qkv, -1.0, out)
    x = _randn(2, 3, 64, dtype=torch.float16, gen=_gen("err2"))
    with pytest.raises(RuntimeError, match="gate needs update"):
        C.norm(x, None, None, None, x[:, 0], x[:, 0], x[:, 0], 1e-6, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match=r"shift must be \[B, C\]"):
        C.norm(x, None, None, None, None, x[0], x[0], 1e-6, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="start must be in"):
        C.exit_confidence(x, torch.ones(64, 1, device=DEV, dtype=torch.float16),
                          torch.ones(1, device=DEV, dtype=torch.float16), 3, torch.empty(2, device=DEV))
    with pytest.raises(RuntimeError, match=r"weight must be \[C, K\]"):
        C.exit_confidence(x, torch.ones(1, 64, device=DEV, dtype=torch.float16),
                          torch.ones(1, device=DEV, dtype=torch.float16), 0, torch.empty(2, device=DEV))


def test_build_info_matches_the_running_torch(C):
    info = C.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert (info["cuda"] or "").split(".")[0] == torch.version.cuda.split(".")[0]
    major, minor = torch.cuda.get_device_capability()
    assert _cpp_lib.arch_supported(major, minor), info
    st = _cpp_lib.status()
    assert st["loaded"] and st["source"] in ("setup.py", "jit") and st["missing_ops"] == []
    print(f"duodiff_fast._C from {st['source']}: {st['path']} archs {st['archs']}")


def test_flops_of_one_large_attention_call_are_sane(C):
    # Not a benchmark (bench/kernels.py is): a smoke test that the kernel is in the tensor-core league.
    qkv = _randn(16, 1026, 3, 16, 64, dtype=torch.bfloat16, gen=_gen("perf"))
    out = torch.empty(16, 1026, 1024, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        C.attention(qkv, 0.125, out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        C.attention(qkv, 0.125, out)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    tflops = 4 * 16 * 16 * 1026 * 1026 * 64 / (ms * 1e-3) / 1e12
    print(f"cuda attention B=16 H=16 L=1026 D=64 bf16: {ms:.3f} ms, {tflops:.0f} TFLOP/s")
    assert tflops > 20 and math.isfinite(tflops)

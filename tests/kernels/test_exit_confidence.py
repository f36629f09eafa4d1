"""Triton exit confidence (kernels/exit_confidence.py) against the float64 reference.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported). The K > 1 path uses tl.dot on fp32 operands (tf32 / tf32x3 on a GPU), which the
interpreter computes correctly for every input dtype because h is upcast before the dot. The
interpreter ignores `input_precision`, so the tf32 test teaches it to round like a tensor core.
"""
import os
import zlib

import numpy as np
import pytest
import torch

from duodiff_fast.ops.numerics import assert_flash_rule

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from duodiff_fast.kernels.exit_confidence import (
    _dot_precision,
    _launch_config,
    aot_specs,
    exit_confidence_fwd,
)

from duodiff_fast.ops.exit_confidence import exit_confidence_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The output is a mean of sigmoids in (0, 1); a GPU's tf32 rounding of fp32 weights fed with 16-bit h
# stays far below 1e-4.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
# (B, L, C, layout of h): "contig", or "strided": tokens 1: of a longer sequence inside a wider buffer.
SHAPES = [
    (1, 1, 64, "contig"),
    (3, 17, 1152, "strided"),
    (3, 17, 72, "contig"),
    (1, 258, 96, "strided"),
]
# start must leave at least one token, so L = 1 only meets start = 0.
CASES = [(*shape, K, start) for shape in SHAPES for K in (1, 12) for start in (0, 2) if start < shape[1]]


def _inputs(B, L, C, K, layout, dtype, seed, weight_transposed=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)

    if layout == "contig":
        h = rand(B, L, C, scale=1.5, offset=0.2)
    else:
        h = rand(B, L + 1, C + 16, scale=1.5, offset=0.2)[:, 1:, 8:8 + C]
    # Scale so z = h @ W + bias is O(1): sigmoid then spans its whole range instead of saturating.
    if weight_transposed:  # like nn.Linear(C, K).weight.T: [C, K] with strides (1, C)
        weight = rand(K, C, scale=C**-0.5).t()
    else:
        weight = rand(C, K, scale=C**-0.5)
    bias = rand(K, scale=0.5)
    return h, weight, bias


def assert_close_to_ref(name, out, ref64, same_dtype, atol):
    """DESIGN §6 (duodiff_fast.ops.numerics): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol,
    every element written."""
    r = assert_flash_rule(name, out, ref64, same_dtype, atol=atol)
    return r["max_err"], r["bound"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B,L,C,layout,K,start", CASES, ids=lambda v: str(v))
def test_exit_confidence_matches_reference(B, L, C, layout, K, start, dtype):
    seed = zlib.crc32(repr((B, L, C, K, start, dtype)).encode())  # fixed across runs, unlike hash()
    h, weight, bias = _inputs(B, L, C, K, layout, dtype, seed)
    out = exit_confidence_fwd(h, weight, bias, start)
    assert_close_to_ref(f"exit_confidence[{B},{L},{C},K={K},start={start},{dtype}]", out,
                        exit_confidence_ref(h, weight, bias, start, upcast=True),
                        exit_confidence_ref(h, weight, bias, start), ATOL[dtype])


@pytest.mark.parametrize("K", [1, 48])
def test_exit_confidence_transposed_linear_weight(K):
    """weight = Linear(C, K).weight.T (column-major [C, K]); K=48 pads to a 64-wide dot."""
    h, weight, bias = _inputs(3, 17, 96, K, "strided", torch.float32, seed=5, weight_transposed=True)
    assert weight.stride() == (1, 96)
    out = exit_confidence_fwd(h, weight, bias, 1)
    assert_close_to_ref(f"exit_confidence_wT[K={K}]", out,
                        exit_confidence_ref(h, weight, bias, 1, upcast=True),
                        exit_confidence_ref(h, weight, bias, 1), ATOL[torch.float32])


@pytest.mark.parametrize("K", [1, 12])
def test_exit_confidence_is_deterministic(K):
    """Several token blocks per sample (two-stage reduction): two calls agree bit for bit."""
    B, L, C = 2, 258, 64
    h, weight, bias = _inputs(B, L, C, K, "strided", torch.bfloat16, seed=9)
    assert -(-(L - 2) // _launch_config(K)[1]) > 1  # more than one token block
    a = exit_confidence_fwd(h, weight, bias, 2)
    b = exit_confidence_fwd(h, weight, bias, 2)
    assert torch.equal(a, b), f"calls differ: {a.tolist()} vs {b.tolist()}"
    assert_close_to_ref(f"exit_confidence_det[K={K}]", a,
                        exit_confidence_ref(h, weight, bias, 2, upcast=True),
                        exit_confidence_ref(h, weight, bias, 2), ATOL[torch.bfloat16])


@pytest.mark.parametrize("K", [1, 12])
def test_exit_confidence_is_batch_invariant(K):
    """A sample's confidence is bitwise the same at B=1, B=7 and B=128 (tile sizes never depend on B):
    an early exit at a threshold must not flip with the batch size."""
    L, C, start = 150, 64, 1  # several token blocks per sample on both paths
    assert -(-(L - start) // _launch_config(K)[1]) > 1
    h128, weight, bias = _inputs(128, L, C, K, "contig", torch.float16, seed=21 + K)
    out128 = exit_confidence_fwd(h128, weight, bias, start)
    picks = [5, 77, 0, 127, 64, 3, 100]  # sample 5 of the big batch sits at row 0 of B=7 ...
    out7 = exit_confidence_fwd(h128[picks].contiguous(), weight, bias, start)
    out1 = exit_confidence_fwd(h128[77:78].clone(), weight, bias, start)
    assert torch.equal(out7, out128[picks]), (out7 - out128[picks]).abs().max().item()
    assert torch.equal(out1, out128[77:78]), f"B=1 {out1.item()!r} vs B=128 {out128[77].item()!r}"
    assert_close_to_ref(f"exit_confidence_batch_invariant[K={K}]", out128,
                        exit_confidence_ref(h128, weight, bias, start, upcast=True),
                        exit_confidence_ref(h128, weight, bias, start), ATOL[torch.float16])


def test_exit_confidence_empty_batch():
    h = torch.randn(0, 5, 64, device=DEVICE)
    for K in (1, 12):
        out = exit_confidence_fwd(h, torch.randn(64, K, device=DEVICE), torch.randn(K, device=DEVICE), 1)
        ref = exit_confidence_ref(h, torch.randn(64, K, device=DEVICE), torch.randn(K, device=DEVICE), 1)
        assert out.shape == ref.shape == (0,) and out.dtype == torch.float32 and out.device == h.device


def test_dot_precision_follows_both_operands():
    half = (torch.float16, torch.bfloat16)
    for h_dtype in half + (torch.float32,):
        for w_dtype in half + (torch.float32,):
            want = "tf32" if h_dtype in half and w_dtype in half else "tf32x3"
            assert _dot_precision(h_dtype, w_dtype) == want, (h_dtype, w_dtype)


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest tf32 (10 mantissa bits, ties to even), as a tensor core reads an fp32 operand."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.to(torch.int32).view(torch.float32)


@pytest.fixture
def tensor_core_tf32(monkeypatch):
    """Under the interpreter, make tl.dot round fp32 operands to tf32 when input_precision is "tf32"
    (tf32x3 and ieee stay exact), as the GPU does; on a GPU the hardware does it."""
    if DEVICE == "cuda":
        yield
        return
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32:
            a = interpreter.TensorHandle(_round_to_tf32(torch.from_numpy(a.data)).numpy(), a.dtype)
            b = interpreter.TensorHandle(_round_to_tf32(torch.from_numpy(b.data)).numpy(), b.dtype)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    yield


@pytest.mark.parametrize("h_dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
def test_exit_confidence_keeps_fp32_weight_precision(h_dtype, tensor_core_tf32):
    """16-bit h with an fp32 weight: the weight must not be rounded to tf32. Each weight sits 0.9 of a
    half tf32 ulp above a tf32 value, so tf32 rounding moves every z down by 2e-4 to 4e-4 relative."""
    B, L, C, K, start = 3, 40, 96, 12, 1
    gen = torch.Generator().manual_seed(31)
    h = (torch.rand(B, L, C, generator=gen) + 0.25).to(DEVICE, h_dtype)
    base = _round_to_tf32(torch.rand(C, K, generator=gen) * 2.0 / C + 0.2 / C)
    half_ulp = torch.ldexp(torch.ones_like(base), torch.frexp(base).exponent - 12)  # of tf32 at base
    weight = (base + 0.9 * half_ulp).to(DEVICE)  # fp32, positive: z > 0 everywhere
    assert torch.equal(_round_to_tf32(weight.cpu()), base), "the weights must round back to the tf32 base"
    bias = torch.full((K,), -0.5, device=DEVICE)
    ref64 = exit_confidence_ref(h, weight, bias, start, upcast=True)
    rounded64 = exit_confidence_ref(h, base.to(DEVICE), bias, start, upcast=True)
    tf32_shift = (rounded64 - ref64).abs().min().item()
    out = exit_confidence_fwd(h, weight, bias, start)
    err = (out.double() - ref64).abs().max().item()
    print(f"h {h_dtype}: error {err:.2e}, tf32 rounding of the weight would move it by >= {tf32_shift:.2e}")
    assert tf32_shift > 2e-5, "test not sensitive: tf32 rounding of the weight must move the result by more than 2e-5"
    assert err < tf32_shift / 10, f"error {err:.2e}: the fp32 weight was rounded (tf32 shift {tf32_shift:.2e})"


def test_exit_confidence_rejects_bad_operands():
    h = torch.randn(2, 5, 64, device=DEVICE)
    w = torch.randn(64, 1, device=DEVICE)
    b = torch.randn(1, device=DEVICE)
    with pytest.raises(ValueError, match="start"):
        exit_confidence_fwd(h, w, b, start=5)
    with pytest.raises(ValueError, match="weight must be"):
        exit_confidence_fwd(h, torch.randn(32, 1, device=DEVICE), b)
    with pytest.raises(ValueError, match="bias must be"):
        exit_confidence_fwd(h, w, torch.randn(2, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last dim"):
        exit_confidence_fwd(h.transpose(1, 2), torch.randn(5, 1, device=DEVICE), b)


def test_aot_specs_are_well_formed():
    specs = aot_specs()
    assert {s["kernel"] for s in specs} == {"exit_confidence", "exit_confidence.reduce"}
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names), s["config"]
        for name, ty in s["signature"].items():
            assert (ty == "constexpr") == (name in s["constexprs"]), (s["config"], name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exit_confidence_large_batch_gpu():
    """B=128, L=257, C=512 in bf16: the shape of the U-ViT probes, many programs per sample."""
    for K in (1, 12):
        h, weight, bias = _inputs(128, 257, 512, K, "contig", torch.bfloat16, seed=K)
        out = exit_confidence_fwd(h, weight, bias, 1)
        assert_close_to_ref(f"exit_confidence_gpu[K={K}]", out,
                            exit_confidence_ref(h, weight, bias, 1, upcast=True),
                            exit_confidence_ref(h, weight, bias, 1), ATOL[torch.bfloat16])

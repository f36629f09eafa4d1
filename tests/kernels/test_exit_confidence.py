"""Triton exit confidence (kernels/exit_confidence.py) against the float64 reference.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported). The K > 1 path uses tl.dot on fp32 operands (tf32 / tf32x3 on a GPU), which the
interpreter computes correctly for every input dtype because h is upcast before the dot.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from duodiff_fast.kernels.exit_confidence import _launch_config, aot_specs, exit_confidence_fwd  # noqa: E402
from duodiff_fast.ops.exit_confidence import exit_confidence_ref  # noqa: E402

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
    """DESIGN §6: max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol."""
    assert out.shape == ref64.shape and out.dtype == torch.float32, f"{name}: {tuple(out.shape)} {out.dtype}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output {out.tolist()}"
    err = (out.double() - ref64).abs()
    terr = (same_dtype.double() - ref64).abs()
    bound = 2 * terr.max().item() + atol
    print(f"{name}: max err {err.max().item():.3e} mean {err.mean().item():.3e} | "
          f"torch fp32 max {terr.max().item():.3e} | bound {bound:.3e}")
    if err.max().item() > bound:
        i = int(err.argmax())
        raise AssertionError(f"{name}: max err {err.max().item():.3e} > bound {bound:.3e} at sample {i}: "
                             f"out {out[i].item()} ref {ref64[i].item()}")


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
    assert -(-(L - 2) // _launch_config(B, L - 2, K)[1]) > 1  # more than one token block
    a = exit_confidence_fwd(h, weight, bias, 2)
    b = exit_confidence_fwd(h, weight, bias, 2)
    assert torch.equal(a, b), f"calls differ: {a.tolist()} vs {b.tolist()}"
    assert_close_to_ref(f"exit_confidence_det[K={K}]", a,
                        exit_confidence_ref(h, weight, bias, 2, upcast=True),
                        exit_confidence_ref(h, weight, bias, 2), ATOL[torch.bfloat16])


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

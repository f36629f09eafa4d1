"""Triton norm family (kernels/norm.py) against the float64 references of duodiff_fast.ops.norm.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), so shapes stay small; every op still meets widths 64/72/96/1152, L in {1, 17, 257},
odd batches, strided rows and the [B, 6C] adaLN chunk layout.
"""
import os
import zlib

import pytest
import torch

from duodiff_fast.ops.numerics import assert_flash_rule

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from duodiff_fast.kernels.norm import _launch_config, aot_specs, lane_use, norm_fwd  # noqa: E402
from duodiff_fast.ops.norm import adaln_ref, add_layer_norm_ref, gated_adaln_ref, layer_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
OPS = ["layer_norm", "add_layer_norm", "adaln", "adaln_affine", "gated_adaln"]
# (B, L, C, layout of x / update): "contig"; "wide": rows strided inside a wider buffer;
# "slice": tokens 1: of a longer sequence, so the sample stride is not L * row stride.
SHAPES = [
    (1, 1, 64, "contig"),
    (3, 17, 72, "wide"),
    (1, 257, 96, "slice"),
    (3, 257, 64, "wide"),
    (3, 17, 1152, "slice"),
    (3, 1, 1152, "wide"),
]


def _rand(*shape, dtype, scale=1.0, offset=0.0, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)


def _rows(B, L, C, layout, dtype, gen, scale=1.0, offset=0.0):
    """A [B, L, C] tensor with the requested memory layout and fresh random values."""
    if layout == "contig":
        return _rand(B, L, C, dtype=dtype, scale=scale, offset=offset, gen=gen)
    if layout == "wide":
        return _rand(B, L, C + 24, dtype=dtype, scale=scale, offset=offset, gen=gen)[..., 8:8 + C]
    if layout == "slice":
        return _rand(B, L + 1, C, dtype=dtype, scale=scale, offset=offset, gen=gen)[:, 1:]
    raise ValueError(layout)


def _mod_chunks(B, C, dtype, gen):
    """shift, scale, gate as strided chunks of one [B, 6C] tensor, like DiT's adaLN Linear output."""
    mod = _rand(B, 6 * C, dtype=dtype, scale=0.5, gen=gen)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    assert shift.stride() == (6 * C, 1)
    return shift, scale, gate


def _poison(like):
    return torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)


def assert_close_to_ref(name, out, ref64, same_dtype, atol):
    """DESIGN §6 (duodiff_fast.ops.numerics): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol,
    every element written; Triton 3.9's interpreter casts fp32 -> bf16 by truncation (a GPU
    rounds to nearest), so there a bf16 output may sit up to one bf16 ulp (<= |ref| * 2**-7) further."""
    truncates = INTERPRETED and out.dtype == torch.bfloat16
    slack = ref64.abs() * 2.0**-7 if truncates else None
    r = assert_flash_rule(name, out, ref64, same_dtype, atol=atol, slack=slack)
    return r["max_err"], r["bound"]


def _case(op, B, L, C, layout, dtype, seed):
    """Run one op through norm_fwd (outputs poisoned) and its references; yields (name, out, ref64, same)."""
    gen = torch.Generator().manual_seed(seed)
    x = _rows(B, L, C, layout, dtype, gen, scale=2.0, offset=0.5)
    u = _rows(B, L, C, layout, dtype, gen)
    w = _rand(C, dtype=dtype, scale=0.5, offset=1.0, gen=gen)
    bias = _rand(C, dtype=dtype, scale=0.5, gen=gen)
    shift, scale, gate = _mod_chunks(B, C, dtype, gen)
    y_out = _poison(x)
    r_out = _poison(x)
    if op == "layer_norm":
        eps = 1e-5
        r, y = norm_fwd(x, eps=eps, weight=w, bias=bias, out=y_out)
        assert r is None
        return [("y", y, layer_norm_ref(x, w, bias, eps, upcast=True), layer_norm_ref(x, w, bias, eps))]
    if op == "add_layer_norm":
        eps = 1e-5
        r, y = norm_fwd(x, eps=eps, weight=w, bias=bias, update=u, out=y_out, residual_out=r_out)
        r64, y64 = add_layer_norm_ref(x, u, w, bias, eps, upcast=True)
        r_t, y_t = add_layer_norm_ref(x, u, w, bias, eps)
        return [("r", r, r64, r_t), ("y", y, y64, y_t)]
    if op == "adaln":
        eps = 1e-6
        r, y = norm_fwd(x, eps=eps, shift=shift, scale=scale, out=y_out)
        assert r is None
        return [("y", y, adaln_ref(x, shift, scale, eps, upcast=True), adaln_ref(x, shift, scale, eps))]
    if op == "adaln_affine":
        eps = 1e-6
        _, y = norm_fwd(x, eps=eps, weight=w, bias=bias, shift=shift, scale=scale, out=y_out)
        return [("y", y, adaln_ref(x, shift, scale, eps, w, bias, upcast=True),
                 adaln_ref(x, shift, scale, eps, w, bias))]
    if op == "gated_adaln":
        eps = 1e-6
        r, y = norm_fwd(x, eps=eps, update=u, gate=gate, shift=shift, scale=scale,
                        out=y_out, residual_out=r_out)
        r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, eps, upcast=True)
        r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale, eps)
        return [("r", r, r64, r_t), ("y", y, y64, y_t)]
    raise ValueError(op)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B,L,C,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("op", OPS)
def test_norm_matches_reference(op, B, L, C, layout, dtype):
    seed = zlib.crc32(repr((op, B, L, C, layout, dtype)).encode())  # fixed across runs, unlike hash()
    for name, out, ref64, same in _case(op, B, L, C, layout, dtype, seed):
        assert out.dtype == dtype
        assert_close_to_ref(f"{op}[{B},{L},{C},{layout},{dtype}].{name}", out, ref64, same, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_norm_2d_rows_and_fresh_outputs(dtype):
    """[N, C] inputs with strided rows; outputs allocated by the launcher come back contiguous."""
    gen = torch.Generator().manual_seed(7)
    N, C = 37, 96
    x = _rand(N, C + 32, dtype=dtype, scale=3.0, offset=-1.0, gen=gen)[:, 16:16 + C]
    u = _rand(N, C, dtype=dtype, gen=gen)
    w = _rand(C, dtype=dtype, scale=0.5, offset=1.0, gen=gen)
    bias = _rand(C, dtype=dtype, scale=0.5, gen=gen)
    _, y = norm_fwd(x, eps=1e-5, weight=w, bias=bias)
    assert y.is_contiguous() and y.shape == x.shape
    assert_close_to_ref("layer_norm_2d", y, layer_norm_ref(x, w, bias, upcast=True),
                        layer_norm_ref(x, w, bias), ATOL[dtype])
    r, y = norm_fwd(x, eps=1e-5, weight=w, bias=bias, update=u)
    r64, y64 = add_layer_norm_ref(x, u, w, bias, upcast=True)
    r_t, y_t = add_layer_norm_ref(x, u, w, bias)
    assert_close_to_ref("add_layer_norm_2d.r", r, r64, r_t, ATOL[dtype])
    assert_close_to_ref("add_layer_norm_2d.y", y, y64, y_t, ATOL[dtype])


def test_norm_residual_in_place():
    """residual_out=x updates the residual stream in place: each program reads its rows before writing."""
    gen = torch.Generator().manual_seed(3)
    B, L, C = 3, 17, 96
    x = _rows(B, L, C, "wide", torch.float16, gen, scale=2.0)
    u = _rows(B, L, C, "wide", torch.float16, gen)
    shift, scale, gate = _mod_chunks(B, C, torch.float16, gen)
    r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, upcast=True)
    r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale)
    r, y = norm_fwd(x, eps=1e-6, update=u, gate=gate, shift=shift, scale=scale, residual_out=x)
    assert r is x
    assert_close_to_ref("gated_adaln_in_place.r", x, r64, r_t, ATOL[torch.float16])
    assert_close_to_ref("gated_adaln_in_place.y", y, y64, y_t, ATOL[torch.float16])


def test_norm_mixed_precision_modulation():
    """bf16 activations with fp32 modulation / affine (a common autocast mix): output stays bf16."""
    gen = torch.Generator().manual_seed(11)
    B, L, C = 3, 17, 72
    x = _rows(B, L, C, "contig", torch.bfloat16, gen, scale=2.0)
    u = _rows(B, L, C, "contig", torch.bfloat16, gen)
    shift, scale, gate = _mod_chunks(B, C, torch.float32, gen)
    r, y = norm_fwd(x, eps=1e-6, update=u, gate=gate, shift=shift, scale=scale)
    assert r.dtype == y.dtype == torch.bfloat16
    r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, upcast=True)
    r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale)
    assert_close_to_ref("gated_adaln_mixed.r", r, r64, r_t, ATOL[torch.bfloat16])
    assert_close_to_ref("gated_adaln_mixed.y", y, y64, y_t, ATOL[torch.bfloat16])


def test_norm_rejects_bad_operands():
    x = torch.randn(2, 5, 64, device=DEVICE)
    mod = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="shift and scale"):
        norm_fwd(x, eps=1e-6, shift=mod)
    with pytest.raises(ValueError, match="gate needs update"):
        norm_fwd(x, eps=1e-6, gate=mod, shift=mod, scale=mod)
    with pytest.raises(ValueError, match="scale must be"):
        norm_fwd(x, eps=1e-6, shift=mod, scale=torch.randn(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last dim"):
        norm_fwd(x.transpose(1, 2), eps=1e-6)
    with pytest.raises(ValueError, match="update must have"):
        norm_fwd(x, eps=1e-6, update=torch.randn(2, 5, 32, device=DEVICE))


@pytest.mark.parametrize("itemsize", [2, 4])
def test_launch_config_keeps_lanes_busy_with_16_byte_vectors(itemsize):
    """Every width 64..4096: power-of-two parts covering the row with >= 87.5% of the lanes on real
    columns (a 2048-wide block at C=1152 had 56%), and enough rows per program that the narrowest part
    gives every thread a whole 16-byte vector (else Triton narrows the loads)."""
    vec = 16 // itemsize
    worst = (1.0, 0)
    for C in range(64, 4097):
        parts, rows, warps = _launch_config(C, itemsize)
        live = [p for p in parts if p]
        assert all(p & (p - 1) == 0 for p in live) and list(live) == sorted(live, reverse=True), (C, parts)
        assert parts[len(live):] == (0,) * (3 - len(live)), (C, parts)
        assert sum(live) >= C and sum(live[:-1]) < C, (C, parts)
        assert 1 <= rows <= 32 and warps in (1, 2, 4, 8), (C, rows, warps)
        if C % vec == 0:
            assert rows * min(live) >= 32 * warps * vec, (C, parts, rows, warps)
        assert lane_use(C, itemsize) == C / sum(live)
        worst = min(worst, (lane_use(C, itemsize), C))
    print(f"itemsize {itemsize}: worst lane use {worst[0]:.3f} at C={worst[1]}")
    assert worst[0] >= 0.875, worst
    assert _launch_config(1152, itemsize)[0] == (1024, 128, 0)  # DiT-XL: no padding at all


def test_aot_specs_are_well_formed():
    specs = aot_specs()
    assert {s["kernel"] for s in specs} == {"norm.layer_norm", "norm.add_layer_norm", "norm.adaln",
                                            "norm.gated_adaln"}
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names), s["config"]
        for name, ty in s["signature"].items():
            assert (ty == "constexpr") == (name in s["constexprs"]), (s["config"], name)

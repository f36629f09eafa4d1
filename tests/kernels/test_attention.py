"""Triton attention kernel (kernels/attention.py) against the float64 reference.

Without a GPU the kernel runs under the Triton interpreter (small shapes, fp16/fp32: the 3.9
interpreter gets bf16 tl.dot wrong); bf16, every head dim, L=1026 and graph capture need a GPU.
Error rule (DESIGN §6): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol(dtype).
"""
import itertools
import os

import pytest
import torch

from duodiff_fast.ops.numerics import assert_flash_rule

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import duodiff_fast.kernels.attention as attention_module  # noqa: E402
from duodiff_fast.kernels.attention import (  # noqa: E402
    _autotuner,
    _bh_bucket,
    _num_programs,
    _split_head_dim,
    _tail_sizes,
    attention_fwd,
    warmup,
)
from duodiff_fast.ops import attention_ref  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
ATOL = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
DTYPES_HERE = [torch.float16, torch.float32]  # bf16 dots are wrong in the interpreter


def _packed_qkv(B, L, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, 3, H, D, generator=g).to(device=DEVICE, dtype=dtype)


def _check(qkv, scale=None, out=None):
    """Run into a NaN-poisoned `out`, check every element written and the error rule; return out."""
    B, L, _, H, D = qkv.shape
    if out is None:
        out = torch.empty(B, L, H * D, device=qkv.device, dtype=qkv.dtype)
    out.fill_(float("nan"))
    res = attention_fwd(qkv, scale, out=out)
    assert res.data_ptr() == out.data_ptr() and res.shape == (B, L, H * D)
    unwritten = torch.isnan(res)
    assert not unwritten.any(), (
        f"{int(unwritten.sum())} outputs never written, first at {unwritten.nonzero()[0].tolist()}")

    ref64 = attention_ref(qkv, scale, upcast=True)
    assert_flash_rule(f"B={B} L={L} H={H} D={D} {qkv.dtype}", res, ref64, attention_ref(qkv, scale),
                      atol=ATOL[qkv.dtype])
    return res


# Every L of DESIGN §6 against every head dim with a non-power-of-two part, dtypes alternating like a
# checkerboard so each L and each D meets both; short sequences also get an odd batch and two heads.
_CASES = [
    ((3, L, 2) if L < 100 else (1, L, 1)) + (D, DTYPES_HERE[(i + j) % 2])
    for (i, L), (j, D) in itertools.product(enumerate((1, 17, 257, 258)), enumerate((32, 48, 64, 72)))
]


@pytest.mark.parametrize("B,L,H,D,dtype", _CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_reference(B, L, H, D, dtype):
    _check(_packed_qkv(B, L, H, D, dtype))


def test_odd_batch_several_heads_with_tail():
    """Odd batch, several heads, full tiles plus a 1-token tail in both dims (129 = 2 * 64 + 1)."""
    _check(_packed_qkv(3, 129, 2, 32, torch.float16, seed=1))


def test_qkv_from_linear_with_padded_rows_and_strided_out():
    """qkv as a view of a wider Linear output (row stride 3*H*D + 8) and out a slice of a wider buffer:
    strides come from the tensors, and nothing outside `out` is touched."""
    B, L, H, D = 3, 130, 2, 72
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(B, L, 3 * H * D + 8, generator=g).to(DEVICE, torch.float16)
    qkv = rows[..., : 3 * H * D].view(B, L, 3, H, D)
    assert not qkv.is_contiguous()
    obuf = torch.full((B, L, H * D + 16), float("nan"), device=DEVICE, dtype=torch.float16)
    _check(qkv, out=obuf[..., : H * D])
    assert torch.isnan(obuf[..., H * D:]).all(), "wrote outside the out view"


def test_misaligned_batch_strided_qkv():
    """Every other batch of a buffer, odd row stride and a base pointer one element off: the kernel
    must not assume vector alignment (ALIGN = 1)."""
    B, L, H, D = 2, 17, 3, 48
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2 * B, L, 3 * H * D + 1, generator=g).to(DEVICE, torch.float32)
    qkv = big[::2, :, 1: 1 + 3 * H * D].view(B, L, 3, H, D)
    _check(qkv)


def test_explicit_scale_and_ragged_length():
    """A custom scale, and L=40 (no full tile, one 64-wide tail in both dims)."""
    _check(_packed_qkv(2, 40, 3, 64, torch.float32, seed=4), scale=0.37)


def test_allocates_output_when_none_given():
    qkv = _packed_qkv(1, 17, 2, 32, torch.float16, seed=5)
    out = attention_fwd(qkv)
    assert out.shape == (1, 17, 64) and out.dtype == torch.float16 and out.is_contiguous()
    torch.testing.assert_close(out.double(), attention_ref(qkv, upcast=True), atol=2e-3, rtol=0)


def test_rejects_bad_inputs():
    qkv = _packed_qkv(1, 4, 1, 32, torch.float32)
    with pytest.raises(ValueError, match=r"\[B, L, 3, H, D\]"):
        attention_fwd(qkv[:, :, :2])
    with pytest.raises(ValueError, match="contiguous"):
        attention_fwd(qkv.transpose(-1, -2))
    with pytest.raises(ValueError, match="out must be"):
        attention_fwd(qkv, out=torch.empty(1, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="positive"):
        attention_fwd(qkv, scale=-1.0)


def test_tiling_covers_sequence_with_one_small_tail():
    """The host tiling the kernel relies on: one masked remainder tile per dim, sized to the remainder."""
    cases = [(257, 128, 64), (258, 128, 128), (1026, 128, 64), (256, 128, 64), (200, 128, 64), (1, 64, 64)]
    for L, bm, bn in cases:
        tail_m, tail_n = _tail_sizes(L, bm, bn)
        for block, tail in ((bm, tail_m), (bn, tail_n)):
            rem = L % block
            assert 16 <= tail <= block and tail >= rem and (rem <= 16 or tail < 2 * rem), (L, block, tail)
    assert _tail_sizes(257, 128, 64) == (16, 16) and _tail_sizes(200, 128, 64) == (128, 16)
    # head dims: a power-of-two part plus a padded remainder, never padded to the next power of two
    assert {D: _split_head_dim(D) for D in (32, 48, 64, 72, 80, 96, 128)} == {
        32: (32, 0), 48: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32), 128: (128, 0)}


class _RecordingKernel:
    """Stands in for the compiled kernel: records the grid and arguments of `kernel[grid](...)`."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((grid(meta) if callable(grid) else grid, args, meta))
        return launch


@pytest.mark.parametrize("B,H,L", [(4375, 16, 257), (4096, 16, 1026), (3, 2, 40), (8, 8, 256)])
def test_grid_is_one_dimensional_beyond_65535_heads(B, H, L, monkeypatch):
    """B*H on grid axis 0 (limit 2**31 - 1), full tiles first: 4375 x 16 = 70,000 (batch 2 x 2188 with
    guidance at 16 heads) used to exceed the 65,535 of grid axis 1. The launch is recorded, not run
    (the interpreter takes about a minute per thousand programs)."""
    fake = _RecordingKernel()
    config = attention_module._config(128, 64, 4, 3, L=L)
    monkeypatch.setattr(attention_module, "_kernel_and_config", lambda L: (fake, config))
    # batch views with stride 0: the shapes without the memory
    qkv = torch.empty(1, L, 3, H, 64, dtype=torch.float16).expand(B, L, 3, H, 64)
    attention_fwd(qkv, out=torch.empty(1, L, H * 64, dtype=torch.float16).expand(B, L, H * 64))
    (grid, args, meta), = fake.calls
    n_main, tail_m = L // 128, config.kwargs["TAIL_M"]
    n_tail = -(-(L % 128) // tail_m)
    assert grid == (B * H * (n_main + n_tail),) == (_num_programs(B * H, L, 128, tail_m),)
    names = attention_module._attention_fwd_kernel.arg_names
    got = dict(zip(names, args))
    assert got["BH"] == B * H and got["H"] == H and got["L"] == L and got["BH_BUCKET"] == _bh_bucket(B * H)
    if B * H > 65535:
        assert grid[0] > 65535


def test_program_count_is_checked():
    """Refused up front with the numbers, not inside the autotuner (a batch view with stride 0: no memory)."""
    def views(B, L, H=16, D=32):
        qkv = torch.empty(1, L, 3, H, D, dtype=torch.float16).expand(B, L, 3, H, D)
        return qkv, torch.empty(1, L, H * D, dtype=torch.float16).expand(B, L, H * D)

    qkv, out = views(2**23, 1026)
    with pytest.raises(ValueError, match=r"B \* H = 134217728 at L = 1026 needs up to \d+ programs.*split"):
        attention_fwd(qkv, out=out)
    qkv, out = views(2**27, 1)
    with pytest.raises(ValueError, match=r"B \* H = 2147483648 does not fit"):
        attention_fwd(qkv, out=out)


def test_old_kernel_kept_for_comparison_still_matches_reference():
    """bench/legacy/attention_v0.py (the pre-fix kernel the GPU benchmark times beside the new one) stays
    correct, so the before / after comparison compares two right answers."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "legacy" / "attention_v0.py"
    spec = importlib.util.spec_from_file_location("attention_v0", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    attention_v0 = mod.attention_fwd

    qkv = _packed_qkv(2, 70, 2, 72, torch.float16, seed=6)
    out = attention_v0(qkv)
    err = (out.double() - attention_ref(qkv, upcast=True)).abs().max().item()
    assert err <= 2 * (attention_ref(qkv).double() - attention_ref(qkv, upcast=True)).abs().max().item() + 2e-4


def test_autotune_key_has_a_bucket_of_batch_times_heads():
    assert _autotuner().keys == ["L", "HEAD_DIM", "BH_BUCKET"]
    buckets = [_bh_bucket(n) for n in (1, 2, 3, 128, 129, 1000, 4096, 70000)]
    assert buckets == [1, 2, 4, 128, 256, 1024, 4096, 4096]


# ------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("D", [32, 48, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("L", [1, 17, 257, 258, 1026])
def test_gpu_bf16_all_head_dims(L, D):
    _check(_packed_qkv(3, L, 4, D, torch.bfloat16, seed=L + D))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("D", [32, 48, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("L", [258, 1026])
def test_gpu_fp16_fp32_all_head_dims(L, D, dtype):
    _check(_packed_qkv(2, L, 3, D, dtype, seed=L * D))


@pytest.mark.gpu
@requires_gpu
def test_gpu_cuda_graph_replay_matches_eager():
    """After `warmup`, capture never autotunes; replay into a poisoned output equals eager bit for bit."""
    shape, dtype = (4, 258, 3, 8, 64), torch.bfloat16
    warmup(shape, dtype, DEVICE)
    qkv = _packed_qkv(shape[0], shape[1], shape[3], shape[4], dtype, seed=7)
    out = torch.empty(shape[0], shape[1], shape[3] * shape[4], device=DEVICE, dtype=dtype)
    eager = attention_fwd(qkv).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention_fwd(qkv, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_fwd(qkv, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    qkv.copy_(_packed_qkv(shape[0], shape[1], shape[3], shape[4], dtype, seed=8))  # new inputs, same graph
    graph.replay()
    assert torch.equal(out, attention_fwd(qkv))

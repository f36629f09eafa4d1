"""CUDA C++ kernels (csrc/) without a GPU: offline compile check, CPU emulation, build plumbing.

1. `bench/csrc_report.py` compiles every .cu for sm_80 and sm_90a and reads the SASS: no compile error,
   no spill, HMMA in the attention main loop, 16-byte accesses in the norm kernels, bindings.cpp
   syntax-checked against the installed torch headers.
2. The kernels themselves run on the CPU: g++ builds csrc/*.cu with -DDUODIFF_EMULATE against the SIMT
   emulator of csrc/emu/ (each thread a fiber; ldmatrix, mma.sync, shuffles and cp.async executed as the
   PTX ISA defines them; warps scheduled adversarially; every memory access bounds-checked), and the
   results are compared with the float64 references of duodiff_fast.ops (DESIGN §6 rule). This checks
   fragment layouts, the online softmax, masking, pipelining and barriers of the real kernel source.
3. setup.py's build plan and duodiff_fast._cpp_lib's JIT plan, on this CPU-only machine.
The GPU side (the compiled extension against references and Triton, graph capture) is
tests/gpu/test_cuda_backend.py.
"""
import ctypes
import importlib.util
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from duodiff_fast.ops.numerics import assert_flash_rule

from duodiff_fast import _cpp_lib
from duodiff_fast.ops.attention import attention_ref
from duodiff_fast.ops.exit_confidence import exit_confidence_ref
from duodiff_fast.ops.norm import adaln_ref, add_layer_norm_ref, gated_adaln_ref, layer_norm_ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


csrc_report = _load("csrc_report", ROOT / "bench" / "csrc_report.py")

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(name, out, ref64, same_dtype, atol):
    """DESIGN §6 (duodiff_fast.ops.numerics): max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol,
    every element written."""
    r = assert_flash_rule(name, out, ref64, same_dtype, atol=atol)
    return r["max_err"], r["bound"]


# ==================================================================================================
# 1. Offline compile check (nvcc + cuobjdump + g++)
# ==================================================================================================

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    missing = csrc_report.missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    out = tmp_path_factory.mktemp("csrc_report")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "csrc_report.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, check=False)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a check failed (asserted one by one below)
    result = json.loads((out / "csrc_report.json").read_text())
    result["markdown"] = (out / "csrc_report.md").read_text()
    return result


def _check(report, prefix):
    found = [c for c in report["checks"] if c["check"].startswith(prefix)]
    assert len(found) == 1, [c["check"] for c in report["checks"]]
    assert found[0]["ok"], found[0]


def _kernel_rows(report, kernel):
    return [r for r in report["rows"] if r["kernel"] == kernel]


def test_every_cu_compiles_for_sm80_and_sm90a(report):
    _check(report, "every .cu compiles")
    files = {(r["file"], r["arch"]) for r in report["rows"]}
    assert files == {(p.name, a) for p in csrc_report.cu_sources() for a in ("sm_80", "sm_90a")}, files
    # every instantiation the launchers can pick was compiled: 7 head dims x 2 dtypes of attention, ...
    for arch in ("sm_80", "sm_90a"):
        assert len([r for r in _kernel_rows(report, "attention_fwd_kernel") if r["arch"] == arch]) == 14
        assert len([r for r in _kernel_rows(report, "norm_fwd_kernel") if r["arch"] == arch]) == 3 * 4 * 4
        assert len([r for r in _kernel_rows(report, "exit_mma_kernel") if r["arch"] == arch]) == 2 * 4


def test_no_kernel_spills(report):
    _check(report, "no spills")
    for r in report["rows"]:
        assert r["spill_bytes"] == 0 and r["local_ld_st"] == 0 and r["regs"] <= 255, r


def test_attention_main_loop_runs_on_tensor_cores(report):
    _check(report, "attention: HMMA in the main loop")
    _check(report, "no convergence code")
    for r in _kernel_rows(report, "attention_fwd_kernel"):
        assert r["hmma_in_loop"] >= 16 and r["hgmma"] == 0, r  # mma.sync on both archs (no wgmma path)
        assert r["ldgsts128"] > 0 and r["stg128"] > 0, r  # 16-byte cp.async in, 16-byte stores out


def test_exit_confidence_uses_tensor_cores(report):
    _check(report, "exit_confidence: HMMA")
    assert all(r["hmma"] == 0 for r in _kernel_rows(report, "exit_simt_kernel"))


def test_norm_kernels_use_16_byte_accesses(report):
    _check(report, "norm: 16-byte loads and stores")
    for r in _kernel_rows(report, "norm_fwd_scalar_kernel"):
        assert r["ldg128"] == 0, r  # the scalar fallback must not assume alignment


def test_bindings_pass_syntax_check(report):
    _check(report, "bindings.cpp passes")


def test_report_markdown_lists_every_row(report):
    md = report["markdown"]
    assert "## Checks" in md and "| kernel | config | arch |" in md
    assert md.count("| attention_fwd_kernel |") == len(_kernel_rows(report, "attention_fwd_kernel"))


def test_sass_parsing_finds_loops_and_wide_accesses():
    sass = """
        Function : _Z3fooPf
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R18, R8 ;
        /*0040*/              @P0  BRA 0x10 ;
        /*0050*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0060*/                   STL [R1], R0 ;
        /*0070*/                   HMMA.16816.F32.BF16 R8, R12, R18, R8 ;
        /*0080*/                   EXIT ;
    """
    fn = csrc_report.split_sass(sass)
    counts = csrc_report.sass_counts(fn["_Z3fooPf"])
    assert counts["hmma"] == 3 and counts["hmma_in_loop"] == 2
    assert counts["ldg128"] == 1 and counts["stg128"] == 1 and counts["ldgsts128"] == 1
    assert counts["local_ld_st"] == 1 and counts["hgmma"] == 0
    ptxas = csrc_report.parse_ptxas(
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    assert ptxas == {"_Z3fooPf": {"stack_frame": 8, "spill_stores": 4, "spill_loads": 4, "regs": 64}}
    usage = csrc_report.parse_res_usage(" Function _Z3fooPf:\n REG:64 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:1")
    assert usage == {"_Z3fooPf": {"regs": 64, "stack_bytes": 8, "static_smem_bytes": 0, "local_bytes": 0}}


def test_checks_fail_on_spills_and_missing_tensor_cores():
    rows = [
        {"kernel": "attention_fwd_kernel", "config": "bf16, 64, 64, 2", "arch": "sm_80", "spill_bytes": 8,
         "local_ld_st": 2, "hmma_in_loop": 0, "warpsync": 0},
        {"kernel": "norm_fwd_kernel", "config": "bf16, 1, 1, 32", "arch": "sm_80", "spill_bytes": 0,
         "local_ld_st": 0, "ldg128": 0, "stg128": 4, "warpsync": 0},
    ]
    result = {c["check"]: c for c in csrc_report.checks(rows, {"error": "boom"})}
    assert not result["no spills (stack, local memory, LDL/STL)"]["ok"]
    assert not result["attention: HMMA in the main loop (sm_80 and sm_90a)"]["ok"]
    assert not result["norm: 16-byte loads and stores in the vector kernels"]["ok"]
    assert not result["exit_confidence: HMMA in the tensor-core kernels"]["ok"]  # none compiled
    assert not result["bindings.cpp passes g++ -fsyntax-only against the torch headers"]["ok"]


# ==================================================================================================
# 2. The kernels on the CPU (SIMT emulator)
# ==================================================================================================

class Emu:
    """ctypes front end of the emulated kernels (csrc/emu/capi.cpp)."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        i64, vp, cs = ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p
        lib.duo_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.duo_emu_buffer.argtypes = [vp, i64, ctypes.c_int]
        lib.duo_emu_attention.restype = cs
        lib.duo_emu_attention.argtypes = [vp, vp, ctypes.c_int] + [i64] * 10 + [ctypes.c_float]
        lib.duo_emu_norm.restype = cs
        lib.duo_emu_norm.argtypes = ([vp, vp, vp, vp, ctypes.c_int, i64, i64, i64, ctypes.POINTER(i64)]
                                     + [vp, ctypes.c_int] * 2 + [vp, ctypes.c_int, i64] * 3 + [ctypes.c_float])
        lib.duo_emu_exit_workspace.restype = i64
        lib.duo_emu_exit_workspace.argtypes = [ctypes.c_int, ctypes.c_int] + [i64] * 9 + [vp, vp]
        lib.duo_emu_exit_uses_mma.restype = ctypes.c_int
        lib.duo_emu_exit_uses_mma.argtypes = [ctypes.c_int, ctypes.c_int] + [i64] * 9 + [vp, vp]
        lib.duo_emu_exit_confidence.restype = cs
        lib.duo_emu_exit_confidence.argtypes = ([vp, ctypes.c_int, vp, ctypes.c_int, vp, ctypes.c_int, vp, vp]
                                                + [i64] * 11)
        self.lib = lib
        self.schedule(0, 1)

    def schedule(self, reverse_warps, deferred_cp_async):
        self.lib.duo_emu_configure(reverse_warps, deferred_cp_async)

    def _buffers(self, **tensors):
        """Register what the kernel may touch: each tensor's extent; outputs writable."""
        for name, t in tensors.items():
            if t is None:
                continue
            span = (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
            self.lib.duo_emu_buffer(t.data_ptr(), span if t.numel() else 0, int(name.startswith("out")))

    @staticmethod
    def _check(err):
        if err is not None:
            raise RuntimeError(err.decode())

    def attention(self, qkv, out, scale):
        B, L, _, H, D = qkv.shape
        self._buffers(qkv=qkv, out=out)
        self._check(self.lib.duo_emu_attention(qkv.data_ptr(), out.data_ptr(), DTYPE_CODE[qkv.dtype], B, L, H, D,
                                               *qkv.stride()[:4], *out.stride()[:2], scale))

    def norm(self, x, out, *, eps, update=None, residual=None, weight=None, bias=None, gate=None, shift=None,
             scale=None):
        B, L, C = x.shape

        def st(t):
            return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

        strides = (ctypes.c_int64 * 8)(*st(x), *st(update), *st(out), *st(residual))

        def op(t, per_sample):
            if t is None:
                return (None, 2) + ((0,) if per_sample else ())
            return (t.data_ptr(), DTYPE_CODE[t.dtype]) + ((t.stride(0),) if per_sample else ())

        self._buffers(x=x, update=update, out=out, out_r=residual, weight=weight, bias=bias, gate=gate,
                      shift=shift, scale=scale)
        self._check(self.lib.duo_emu_norm(
            x.data_ptr(), None if update is None else update.data_ptr(), out.data_ptr(),
            None if residual is None else residual.data_ptr(), DTYPE_CODE[x.dtype], B, L, C, strides,
            *op(weight, False), *op(bias, False), *op(gate, True), *op(shift, True), *op(scale, True), eps))

    def _exit_args(self, h, weight, start):
        B, L, C = h.shape
        return (DTYPE_CODE[h.dtype], DTYPE_CODE[weight.dtype], B, L, C, weight.shape[1], start, h.stride(0),
                h.stride(1), weight.stride(0), weight.stride(1), h.data_ptr(), weight.data_ptr())

    def exit_uses_mma(self, h, weight, start=0):
        return bool(self.lib.duo_emu_exit_uses_mma(*self._exit_args(h, weight, start)))

    def exit_confidence(self, h, weight, bias, start=0):
        B, L, C = h.shape
        K = weight.shape[1]
        n = self.lib.duo_emu_exit_workspace(*self._exit_args(h, weight, start))
        ws = torch.full((max(n, 1),), float("nan"))
        out = torch.full((B,), float("nan"))
        self._buffers(h=h, weight=weight, bias=bias, out_ws=ws, out=out)
        self._check(self.lib.duo_emu_exit_confidence(
            h.data_ptr(), DTYPE_CODE[h.dtype], weight.data_ptr(), DTYPE_CODE[weight.dtype], bias.data_ptr(),
            DTYPE_CODE[bias.dtype], out.data_ptr(), ws.data_ptr(), B, L, C, K, start, h.stride(0), h.stride(1),
            weight.stride(0), weight.stride(1), bias.stride(0), out.stride(0)))
        return out


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    lib = tmp_path_factory.mktemp("emu") / "libduodiff_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-DDUODIFF_EMULATE", f"-I{CSRC}", "-o", str(lib),
           "-x", "c++", *map(str, sorted(CSRC.glob("*.cu"))), "-x", "none",
           str(CSRC / "emu" / "simt.cpp"), str(CSRC / "emu" / "capi.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Emu(lib)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(*shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def _poison(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


# ---- attention -----------------------------------------------------------------------------------

HEAD_DIMS = [32, 48, 64, 72, 80, 96, 128]


def _attention_case(emu, B, L, H, D, dtype, *, qkv=None, out=None, scale=None, name=""):
    gen = _gen("attn", B, L, H, D, str(dtype), name)
    if qkv is None:
        qkv = _randn(B, L, 3, H, D, dtype=dtype, gen=gen, scale=1.5)
    if out is None:
        out = _poison(B, L, H * D, dtype=dtype)
    scale = D**-0.5 if scale is None else scale
    emu.attention(qkv, out, scale)
    ref64 = attention_ref(qkv, scale, upcast=True)
    same = attention_ref(qkv.float(), scale).to(dtype)  # torch's own math, rounded once to the dtype
    assert_close_to_ref(f"attention[{B},{L},{H},{D},{dtype}]{name}", out, ref64, same, ATOL[dtype])
    return out


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_attention_every_head_dim(emu, D, dtype):
    # L = 130: two full 64-key blocks and a 2-key masked tail, a full and a 2-row query tile (D <= 64:
    # tiles of 128 rows, one of them 2 rows; D > 64: tiles of 64 rows).
    _attention_case(emu, 2, 130, 2, D, dtype)


@pytest.mark.parametrize("L", [1, 17, 64, 65, 128, 129, 257])
def test_emulated_attention_sequence_lengths(emu, L):
    # 1: a lone key and query; 64 / 128: no tail at all; 65 / 129 / 257: one-key tails (U-ViT's 2^k + 1).
    _attention_case(emu, 1, L, 1, 64, torch.float16)
    _attention_case(emu, 1, L, 1, 72, torch.bfloat16)


@pytest.mark.parametrize("reverse,deferred", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_emulated_attention_under_every_schedule(emu, reverse, deferred):
    # Warps run to the next barrier forward or backward; cp.async lands at issue or only at its wait
    # (poisoning the stage meanwhile). A missing __syncthreads or wait_group breaks one of these.
    emu.schedule(reverse, deferred)
    try:
        _attention_case(emu, 1, 200, 2, 64, torch.float16, name=f"schedule{reverse}{deferred}")
        _attention_case(emu, 1, 150, 1, 96, torch.bfloat16, name=f"schedule{reverse}{deferred}")
    finally:
        emu.schedule(0, 1)


def test_emulated_attention_strided_views_and_scale(emu):
    B, L, H, D = 2, 67, 3, 48
    gen = _gen("attn-strided")
    # qkv as a view into a wider Linear output (row padding), out a column slice of a wider buffer
    wide = _randn(B, L, 3 * H * D + 16, dtype=torch.float16, gen=gen)
    qkv = wide[:, :, 8:8 + 3 * H * D].view(B, L, 3, H, D)
    out_buf = _poison(B, L, H * D + 24, dtype=torch.float16)
    out = out_buf[:, :, 16:16 + H * D]
    _attention_case(emu, B, L, H, D, torch.float16, qkv=qkv, out=out, scale=0.3, name="strided")
    assert torch.isnan(out_buf[:, :, :16]).all() and torch.isnan(out_buf[:, :, 16 + H * D:]).all()


def test_emulated_attention_large_scores_stay_finite(emu):
    # Scores ~ +-200: exp2 without the running max would overflow; the online softmax must not.
    gen = _gen("attn-large")
    qkv = _randn(1, 100, 3, 1, 64, dtype=torch.bfloat16, gen=gen, scale=4.0)
    _attention_case(emu, 1, 100, 1, 64, torch.bfloat16, qkv=qkv, scale=1.0, name="large")


def test_emulated_attention_rejects_what_the_binding_must_fix(emu):
    qkv = _randn(1, 8, 3, 1, 64, dtype=torch.float16, gen=_gen("bad"))
    out = _poison(1, 8, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim not supported"):
        emu.attention(qkv[..., :40], _poison(1, 8, 40, dtype=torch.float16), 0.1)
    with pytest.raises(RuntimeError, match="multiple of 8 elements"):
        wide = _randn(1, 8, 3 * 64 + 4, dtype=torch.float16, gen=_gen("bad2"))
        emu.attention(wide[:, :, :192].view(1, 8, 3, 1, 64), out, 0.1)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        emu.attention(qkv, out, 0.0)


def test_emulator_catches_out_of_bounds_access(emu):
    # The output buffer is registered shorter than the kernel writes: the emulator must refuse.
    qkv = _randn(1, 16, 3, 1, 64, dtype=torch.float16, gen=_gen("oob"))
    out = _poison(1, 16, 64, dtype=torch.float16)
    emu.lib.duo_emu_buffer(qkv.data_ptr(), qkv.numel() * 2, 0)
    emu.lib.duo_emu_buffer(out.data_ptr(), 15 * 64 * 2, 1)
    err = emu.lib.duo_emu_attention(qkv.data_ptr(), out.data_ptr(), 0, 1, 16, 1, 64, *qkv.stride()[:4],
                                    *out.stride()[:2], 0.125)
    assert err is not None and b"outside every buffer" in err, err


# ---- norm family ---------------------------------------------------------------------------------

def _rows(B, L, C, layout, dtype, gen, scale=1.0, offset=0.0):
    if layout == "contig":
        return _randn(B, L, C, dtype=dtype, gen=gen, scale=scale, offset=offset)
    if layout == "wide":  # rows strided inside a wider buffer; the gaps hold NaN (a read shows)
        buf = _poison(B, L, C + 24, dtype=dtype)
        buf[..., 8:8 + C] = _randn(B, L, C, dtype=dtype, gen=gen, scale=scale, offset=offset)
        return buf[..., 8:8 + C]
    if layout == "odd":  # rows at an odd element offset: not 16-byte aligned -> the scalar path
        buf = _poison(B, L, C + 3, dtype=dtype)
        buf[..., 1:1 + C] = _randn(B, L, C, dtype=dtype, gen=gen, scale=scale, offset=offset)
        return buf[..., 1:1 + C]
    raise ValueError(layout)


def _norm_case(emu, op, B, L, C, layout, dtype, mod_dtype=None, name=""):
    gen = _gen("norm", op, B, L, C, layout, str(dtype), str(mod_dtype))
    mod_dtype = mod_dtype or dtype
    x = _rows(B, L, C, layout, dtype, gen, scale=2.0, offset=0.5)
    u = _rows(B, L, C, layout, dtype, gen)
    w = _randn(C, dtype=mod_dtype, gen=gen, scale=0.5, offset=1.0)
    bias = _randn(C, dtype=mod_dtype, gen=gen, scale=0.5)
    ada = _randn(B, 6 * C, dtype=mod_dtype, gen=gen, scale=0.5)  # DiT's adaLN output: strided chunks
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    y = _poison(B, L, C, dtype=dtype)
    r = _poison(B, L, C, dtype=dtype)
    tag = f"{op}[{B},{L},{C},{layout},{dtype},{mod_dtype}]{name}"
    if op == "layer_norm":
        emu.norm(x, y, eps=1e-5, weight=w, bias=bias)
        checks = [("y", y, layer_norm_ref(x, w, bias, 1e-5, upcast=True), layer_norm_ref(x, w, bias, 1e-5))]
    elif op == "add_layer_norm":
        emu.norm(x, y, eps=1e-5, update=u, residual=r, weight=w, bias=bias)
        r64, y64 = add_layer_norm_ref(x, u, w, bias, 1e-5, upcast=True)
        r_t, y_t = add_layer_norm_ref(x, u, w, bias, 1e-5)
        checks = [("r", r, r64, r_t), ("y", y, y64, y_t)]
    elif op == "adaln":
        emu.norm(x, y, eps=1e-6, shift=shift, scale=scale)
        checks = [("y", y, adaln_ref(x, shift, scale, 1e-6, upcast=True), adaln_ref(x, shift, scale, 1e-6))]
    elif op == "adaln_affine":
        emu.norm(x, y, eps=1e-6, shift=shift, scale=scale, weight=w, bias=bias)
        checks = [("y", y, adaln_ref(x, shift, scale, 1e-6, w, bias, upcast=True),
                   adaln_ref(x, shift, scale, 1e-6, w, bias))]
    elif op == "gated_adaln":
        emu.norm(x, y, eps=1e-6, update=u, residual=r, gate=gate, shift=shift, scale=scale)
        r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, 1e-6, upcast=True)
        r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale, 1e-6)
        checks = [("r", r, r64, r_t), ("y", y, y64, y_t)]
    else:
        raise ValueError(op)
    for what, out, ref64, same in checks:
        assert_close_to_ref(f"{tag}.{what}", out, ref64, same, ATOL[dtype])


NORM_OPS = ["layer_norm", "add_layer_norm", "adaln", "adaln_affine", "gated_adaln"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", NORM_OPS)
def test_emulated_norm_ops(emu, op, dtype):
    # C = 72: 9 vectors of 8 (16-bit) -> 8 lanes per row with a ragged second vector; 17 rows = 2 blocks
    _norm_case(emu, op, 3, 17, 72, "wide", dtype)


@pytest.mark.parametrize("C", [64, 96, 256, 512, 1152, 4096])
def test_emulated_norm_launch_shapes(emu, C):
    # 16-bit rows of C / 8 vectors: 8 / 16 / 32 lanes per row, then 2 and 4 warps per row (1152, 4096)
    _norm_case(emu, "gated_adaln", 2, 3, C, "contig", torch.bfloat16)
    _norm_case(emu, "add_layer_norm", 1, 2, C, "contig", torch.float32)


def test_emulated_norm_widest_rows(emu):
    _norm_case(emu, "adaln", 1, 1, 16384, "contig", torch.float16)   # 16 warps x 4 vectors: the widest vector row
    _norm_case(emu, "adaln", 1, 1, 16392, "contig", torch.float16)   # one vector more: the scalar path


@pytest.mark.parametrize("layout,C", [("odd", 64), ("contig", 70), ("odd", 1152)])
def test_emulated_norm_scalar_path(emu, layout, C):
    for op in ("gated_adaln", "layer_norm"):
        _norm_case(emu, op, 2, 5, C, layout, torch.float16)


def test_emulated_norm_mixed_precision_modulation(emu):
    _norm_case(emu, "gated_adaln", 3, 17, 72, "contig", torch.bfloat16, mod_dtype=torch.float32)
    _norm_case(emu, "adaln_affine", 2, 9, 1152, "contig", torch.float16, mod_dtype=torch.float32)


def test_emulated_norm_residual_in_place(emu):
    gen = _gen("norm-inplace")
    B, L, C = 3, 17, 96
    x = _rows(B, L, C, "wide", torch.float16, gen, scale=2.0)
    u = _rows(B, L, C, "wide", torch.float16, gen)
    ada = _randn(B, 6 * C, dtype=torch.float16, gen=gen, scale=0.5)
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    r64, y64 = gated_adaln_ref(x, u, gate, shift, scale, 1e-6, upcast=True)
    r_t, y_t = gated_adaln_ref(x, u, gate, shift, scale, 1e-6)
    y = _poison(B, L, C, dtype=torch.float16)
    emu.norm(x, y, eps=1e-6, update=u, residual=x, gate=gate, shift=shift, scale=scale)
    assert_close_to_ref("gated_adaln_in_place.r", x, r64, r_t, ATOL[torch.float16])
    assert_close_to_ref("gated_adaln_in_place.y", y, y64, y_t, ATOL[torch.float16])


def test_emulated_norm_rejects_bad_operands(emu):
    x = _randn(1, 2, 64, dtype=torch.float16, gen=_gen("nb"))
    y = _poison(1, 2, 64, dtype=torch.float16)
    mod = _randn(1, 64, dtype=torch.float16, gen=_gen("nb2"))
    with pytest.raises(RuntimeError, match="shift and scale come together"):
        emu.norm(x, y, eps=1e-6, shift=mod)
    with pytest.raises(RuntimeError, match="gate needs update"):
        emu.norm(x, y, eps=1e-6, gate=mod, shift=mod, scale=mod)
    with pytest.raises(RuntimeError, match="fp32 or of x's dtype"):
        emu.norm(x, y, eps=1e-6, shift=mod.bfloat16(), scale=mod)


# ---- exit confidence ------------------------------------------------------------------------------

def _exit_inputs(B, L, C, K, dtype, w_dtype, layout, gen):
    if layout == "contig":
        h = _randn(B, L, C, dtype=dtype, gen=gen, scale=1.5, offset=0.2)
    else:  # tokens 1: of a longer sequence inside a wider buffer
        h = _randn(B, L + 1, C + 16, dtype=dtype, gen=gen, scale=1.5, offset=0.2)[:, 1:, 8:8 + C]
    weight = _randn(K, C, dtype=w_dtype, gen=gen, scale=C**-0.5).t()  # nn.Linear(C, K).weight.t()
    bias = _randn(K, dtype=w_dtype, gen=gen, scale=0.5)
    return h, weight, bias


def _exit_case(emu, B, L, C, K, start, dtype, w_dtype=None, layout="contig", expect_mma=None):
    gen = _gen("exit", B, L, C, K, start, str(dtype), str(w_dtype), layout)
    h, weight, bias = _exit_inputs(B, L, C, K, dtype, w_dtype or dtype, layout, gen)
    if expect_mma is not None:
        assert emu.exit_uses_mma(h, weight, start) == expect_mma
    out = emu.exit_confidence(h, weight, bias, start)
    ref64 = exit_confidence_ref(h, weight, bias, start, upcast=True)
    same = exit_confidence_ref(h, weight, bias, start)  # fp32 math, the op's contract
    assert_close_to_ref(f"exit[{B},{L},{C},{K},{start},{dtype},{w_dtype}]", out, ref64, same, 1e-5)
    return h, weight, bias, out


@pytest.mark.parametrize("K", [2, 12, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_exit_confidence_tensor_cores(emu, K, dtype):
    # K = 2 / 12: 16 outputs per pass; 33: 64 (8 n-tiles); 130: two passes of 128. C = 200 leaves a
    # ragged last chunk of 8 channels; 70 tokens past start = a full and a 6-token block.
    _exit_case(emu, 2, 72, 200, K, 2, dtype, expect_mma=True)


@pytest.mark.parametrize("dtype,w_dtype,K", [
    (torch.bfloat16, torch.bfloat16, 1),    # the DuoDiff probe: CUDA cores, 16-byte loads of h
    (torch.float32, torch.float32, 1),
    (torch.float32, torch.float32, 12),     # fp32 weight: never rounded to tf32 / bf16
    (torch.float16, torch.float32, 7),      # mixed: fp32 math
    (torch.bfloat16, torch.float16, 5),
], ids=["bf16-K1", "fp32-K1", "fp32-K12", "fp16-w32-K7", "bf16-w16-K5"])
def test_emulated_exit_confidence_cuda_cores(emu, dtype, w_dtype, K):
    _exit_case(emu, 3, 40, 96, K, 1, dtype, w_dtype, layout="strided", expect_mma=False)


def test_emulated_exit_confidence_unaligned_h_falls_back(emu):
    gen = _gen("exit-odd")
    h = _randn(2, 10, 67, dtype=torch.float16, gen=gen)[:, :, :66]  # row stride 67: not 16-byte aligned
    weight = _randn(66, 4, dtype=torch.float16, gen=gen, scale=66**-0.5)
    bias = _randn(4, dtype=torch.float16, gen=gen)
    assert not emu.exit_uses_mma(h, weight)
    out = emu.exit_confidence(h, weight, bias, 0)
    assert_close_to_ref("exit_unaligned", out, exit_confidence_ref(h, weight, bias, upcast=True),
                        exit_confidence_ref(h, weight, bias), 1e-5)


@pytest.mark.parametrize("K", [1, 12])
def test_emulated_exit_confidence_does_not_depend_on_the_batch(emu, K):
    # A sample's result is bit-identical alone or inside a batch (block sizes depend on C, K only).
    h, weight, bias, out = _exit_case(emu, 3, 70, 128, K, 0, torch.bfloat16)
    for b in range(3):
        alone = emu.exit_confidence(h[b:b + 1].contiguous(), weight, bias, 0)
        assert torch.equal(alone, out[b:b + 1]), (b, alone, out)
    again = emu.exit_confidence(h, weight, bias, 0)
    assert torch.equal(again, out)


# ==================================================================================================
# 3. Build plumbing: setup.py and the JIT build of _cpp_lib (CPU-only here)
# ==================================================================================================

def _setup():
    return _load("duodiff_setup", ROOT / "setup.py")


def test_setup_builds_every_source_for_the_requested_archs():
    kw = _setup().extension_kwargs("80;90a", "2.11.0+cu130", "13.0")
    assert kw["name"] == "duodiff_fast._C"
    assert sorted(kw["sources"]) == sorted(f"csrc/{s}" for s in _cpp_lib.SOURCES)
    assert all((ROOT / s).exists() for s in kw["sources"])
    assert {p.name for p in CSRC.glob("*.cu")} | {"bindings.cpp"} == {Path(s).name for s in kw["sources"]}
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert nvcc[-4:] == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
    assert "--use_fast_math" in nvcc and "-Xptxas=--warn-on-spills" in nvcc
    assert dict(kw["define_macros"]) == {"DUODIFF_CUDA_ARCHS_RAW": "80,90a", "DUODIFF_TORCH_VERSION_RAW": "2.11.0+cu130",
                                         "DUODIFF_TORCH_CUDA_RAW": "13.0"}
    # macro values reach the compiler through a shell (ninja): no quotes, spaces or semicolons
    assert not any(set(v) & set("\"'; ") for _, v in kw["define_macros"])
    one = _setup().extension_kwargs("9.0a", "2.11.0", "13.0")["extra_compile_args"]["nvcc"]
    assert one[-2:] == ["-gencode", "arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="DUODIFF_CUDA_ARCHS"):
        _setup().extension_kwargs(" ; ", "2.11.0", "13.0")


def test_setup_plan_without_cuda_builds_nothing():
    plan = _setup().cuda_build_plan
    assert plan({"DUODIFF_SKIP_CUDA_BUILD": "1"}) == (False, "DUODIFF_SKIP_CUDA_BUILD is set")
    if torch.version.cuda is None:
        build, reason = plan({"DUODIFF_FORCE_CUDA_BUILD": "1"})
        assert not build and "CPU build" in reason
    assert _setup().cuda_sources()  # csrc/ is not empty any more, and csrc/emu/ is not part of it
    assert not any("emu" in Path(s).parts for s in _setup().cuda_sources())


def test_build_info_macros_stringify_through_the_preprocessor(tmp_path):
    # bindings.cpp turns the bare -D tokens back into strings; check that with the real macros.
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    src = tmp_path / "t.cpp"
    text = (CSRC / "bindings.cpp").read_text()
    block = text[text.index("#define DUO_STR2"):text.index("namespace {")]
    src.write_text("#include <cstdio>\n" + block + 'int main() { std::printf("%s|%s|%s", DUODIFF_CUDA_ARCHS, '
                   "DUODIFF_TORCH_VERSION, DUODIFF_TORCH_CUDA); }\n")
    macros = _cpp_lib.build_macros("80;90a", "2.6.0a0+git1234abc", "12.4")
    exe = tmp_path / "t"
    cmd = [cxx, "-std=c++17", *[f"-D{k}={v}" for k, v in macros], str(src), "-o", str(exe)]
    subprocess.run(["sh", "-c", " ".join(cmd)], check=True)  # through a shell, as ninja does
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert out == "80,90a|2.6.0a0+git1234abc|12.4"
    assert _cpp_lib.parse_archs(out.split("|")[0]) == ["80", "90a"]


def test_jit_plan_respects_the_skip_switch_and_explains_itself():
    build, why, archs = _cpp_lib.jit_plan({"DUODIFF_SKIP_CUDA_BUILD": "1"})
    assert (build, archs) == (False, None) and "DUODIFF_SKIP_CUDA_BUILD" in why
    if torch.version.cuda is None:
        build, why, _ = _cpp_lib.jit_plan({})
        assert not build and "CPU build" in why


def test_jit_plan_without_sources_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    build, why, _ = _cpp_lib.jit_plan({}, csrc=tmp_path)
    assert not build and "source checkout" in why


def test_jit_plan_on_a_gpu_machine_targets_the_running_arch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_cpp_lib.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert _cpp_lib.jit_plan({}) == (True, _cpp_lib.jit_plan({})[1], "90a")
    assert _cpp_lib.jit_plan({"DUODIFF_CUDA_ARCHS": "80"})[2] == "80"
    monkeypatch.setattr(_cpp_lib.shutil, "which", lambda name: None if name == "ninja" else f"/usr/bin/{name}")
    build, why, _ = _cpp_lib.jit_plan({})
    assert not build and "ninja" in why


def test_jit_cache_name_changes_with_sources_archs_and_torch(tmp_path):
    for name in _cpp_lib.SOURCES:
        (tmp_path / name).write_text("// " + name)
    a = _cpp_lib.jit_name("90a", "2.11.0", csrc=tmp_path)
    assert a == _cpp_lib.jit_name("90a", "2.11.0", csrc=tmp_path) and a.startswith("duodiff_fast_C_")
    assert a != _cpp_lib.jit_name("80", "2.11.0", csrc=tmp_path)
    assert a != _cpp_lib.jit_name("90a", "2.12.0", csrc=tmp_path)
    (tmp_path / "norm.cu").write_text("// edited")
    assert a != _cpp_lib.jit_name("90a", "2.11.0", csrc=tmp_path)
    (tmp_path / "emu").mkdir()
    b = _cpp_lib.jit_name("90a", "2.11.0", csrc=tmp_path)
    (tmp_path / "emu" / "simt.cpp").write_text("// the emulator is not part of the extension")
    assert b == _cpp_lib.jit_name("90a", "2.11.0", csrc=tmp_path)


@pytest.fixture
def fresh_cpp_lib():
    _cpp_lib._reset_for_tests()
    yield
    _cpp_lib._reset_for_tests()


@pytest.mark.skipif(importlib.util.find_spec("duodiff_fast._C") is not None, reason="the extension is built here")
def test_failed_jit_build_is_a_typed_error_with_one_warning(fresh_cpp_lib, monkeypatch):
    monkeypatch.setattr(_cpp_lib, "jit_plan", lambda *a, **k: (True, "pretend", "90a"))

    def boom(archs):
        raise RuntimeError("Error building extension 'duodiff_fast_C_x':\nnvcc fatal : Unsupported gpu architecture")

    monkeypatch.setattr(_cpp_lib, "_jit_build", boom)
    with pytest.warns(RuntimeWarning, match="JIT build failed") as record:
        st = _cpp_lib.status()
    with pytest.raises(_cpp_lib.ExtensionBuildError, match="Unsupported gpu architecture"):
        _cpp_lib.get()  # the build is attempted once per process: no second warning
    assert len([w for w in record if "duodiff_fast" in str(w.message)]) == 1
    assert issubclass(_cpp_lib.ExtensionBuildError, _cpp_lib.ExtensionNotBuiltError)
    assert st["loaded"] is False and st["jit"]["attempted"] is True and st["source"] is None


@pytest.mark.skipif(importlib.util.find_spec("duodiff_fast._C") is not None, reason="the extension is built here")
def test_jit_built_module_is_used_and_reported(fresh_cpp_lib, monkeypatch):
    import types

    mod = types.ModuleType("duodiff_fast_C_abc")
    mod.__file__ = "/cache/duodiff_fast_C_abc.so"
    mod.build_info = lambda: {"torch": torch.__version__, "cuda": torch.version.cuda, "archs": "90a"}
    for f in _cpp_lib.contract():
        setattr(mod, f, lambda *a: None)
    monkeypatch.setattr(_cpp_lib, "jit_plan", lambda *a, **k: (True, "pretend", "90a"))
    monkeypatch.setattr(_cpp_lib, "_jit_build", lambda archs: mod)
    assert _cpp_lib.get() is mod
    st = _cpp_lib.status()
    assert st["source"] == "jit" and st["loaded"] and st["archs"] == ["90a"] and st["path"] == mod.__file__
    assert st["missing_ops"] == []


def test_not_built_on_this_machine_explains_why_no_jit(fresh_cpp_lib):
    st = _cpp_lib.status()
    if st["loaded"]:
        pytest.skip("the extension is available here")
    assert st["jit"] is not None and st["jit"]["reason"]
    assert "DUODIFF_SKIP_CUDA_BUILD" in st["hint"]

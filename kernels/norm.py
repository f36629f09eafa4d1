"""Layer-norm family in one Triton kernel: plain LN, residual-add + LN, adaLN, gated adaLN.

`_norm_fwd_kernel` is specialised at compile time by HAS_RESIDUAL / HAS_GATE / HAS_MOD / HAS_WEIGHT /
HAS_BIAS, so each op of `duodiff_fast.ops.norm` is one pass over memory: read x (and update), write the
residual (when there is one) and y. Statistics are fp32; every output is cast once on store.

Lanes. A row of width C is not padded to the next power of two (C=1152 in a 2048-wide block leaves 44%
of the lanes idle): C is a compile-time constant, split into at most three power-of-two parts
(1152 = 1024 + 128, 768 = 512 + 256, 72 = 64 + 8; a remainder too small to keep every thread busy is
padded to the smallest part allowed, e.g. 1040 = 1024 + 128 with 16 masked), and each program takes
ROWS rows, enough that even the narrowest part gives every thread one whole 16-byte vector. So every
load and store of x, update, residual and y is a 16-byte LDG/STG.E.128 (when C is a multiple of 16
bytes), and at every width from 64 to 4096 at least 87% of the lanes hold real columns (`lane_use`).

Rows. Without per-sample operands (layer_norm, add_layer_norm) a program's ROWS rows are consecutive rows
of the flattened [B * L] sequence. With them (adaln, gated_adaln: shift / scale / gate are [B, C]) a
program takes ROWS tokens of one sample, so the [C] modulation rows are loaded once per program as
vectors instead of once per row.

Integer arguments are not specialised by value (`do_not_specialize`); the ALIGN constexpr (a power of
two dividing every row stride) restores the divisibility the vector loads need, so the compile report's
`aot_specs` are exactly the kernels that run.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _cols(OFF: tl.constexpr, W: tl.constexpr, C: tl.constexpr):
    """Column indices of one part and whether they are inside the row (a constant for exact parts)."""
    cols = OFF + tl.arange(0, W)
    return cols, cols < C


@triton.jit
def _load_rows(ptr_rows, row_ok, OFF: tl.constexpr, W: tl.constexpr, C: tl.constexpr, EVICT: tl.constexpr):
    """[ROWS, W] fp32 tile of columns [OFF, OFF + W) of the rows at `ptr_rows` (zero outside)."""
    cols, col_ok = _cols(OFF, W, C)
    ptrs = ptr_rows[:, None] + cols[None, :]
    if OFF + W > C:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy=EVICT)
    else:  # the mask is constant along the row: loads stay 16-byte vectors
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0, eviction_policy=EVICT)
    return x.to(tl.float32)


@triton.jit
def _store_rows(ptr_rows, row_ok, x, OFF: tl.constexpr, W: tl.constexpr, C: tl.constexpr):
    cols, col_ok = _cols(OFF, W, C)
    ptrs = ptr_rows[:, None] + cols[None, :]
    if OFF + W > C:
        tl.store(ptrs, x.to(ptr_rows.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, x.to(ptr_rows.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _load_vec(ptr, OFF: tl.constexpr, W: tl.constexpr, C: tl.constexpr):
    """[W] fp32 vector of columns [OFF, OFF + W) of one [C] row (weight, bias, a sample's modulation)."""
    cols, col_ok = _cols(OFF, W, C)
    if OFF + W > C:
        v = tl.load(ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last")
    else:
        v = tl.load(ptr + cols, eviction_policy="evict_last")
    return v.to(tl.float32)


@triton.jit
def _residual_part(X_rows, U_rows, R_rows, G_row, row_ok, OFF: tl.constexpr, W: tl.constexpr,
                   C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr):
    """x (+ [gate *] update, stored as the residual) of one part, fp32."""
    x = _load_rows(X_rows, row_ok, OFF, W, C, "evict_first")
    if HAS_RESIDUAL:
        u = _load_rows(U_rows, row_ok, OFF, W, C, "evict_first")
        if HAS_GATE:
            u = u * _load_vec(G_row, OFF, W, C)[None, :]
        x = x + u
        _store_rows(R_rows, row_ok, x, OFF, W, C)
    return x


@triton.jit
def _output_part(Y_rows, row_ok, xc, rstd, W_ptr, BIAS_ptr, SH_row, SC_row, OFF: tl.constexpr,
                 W: tl.constexpr, C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_MOD: tl.constexpr):
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * _load_vec(W_ptr, OFF, W, C)[None, :]
    if HAS_BIAS:
        y = y + _load_vec(BIAS_ptr, OFF, W, C)[None, :]
    if HAS_MOD:
        y = y * (1.0 + _load_vec(SC_row, OFF, W, C)[None, :]) + _load_vec(SH_row, OFF, W, C)[None, :]
    _store_rows(Y_rows, row_ok, y, OFF, W, C)


@triton.jit
def _centered(x, OFF: tl.constexpr, W: tl.constexpr, C: tl.constexpr, mean):
    xc = x - mean[:, None]
    if OFF + W > C:  # padded columns must not enter the variance
        _, col_ok = _cols(OFF, W, C)
        xc = tl.where(col_ok[None, :], xc, 0.0)
    return xc


@triton.jit(do_not_specialize=["N", "L", "stride_xb", "stride_xl", "stride_ub", "stride_ul", "stride_rb",
                               "stride_rl", "stride_yb", "stride_yl", "stride_gb", "stride_shb", "stride_scb"])
def _norm_fwd_kernel(
    X_ptr,  # (B, L, C) input rows, last dim contiguous
    U_ptr,  # (B, L, C) update added to x (HAS_RESIDUAL)
    G_ptr,  # (B, C) per-sample gate on the update (HAS_GATE)
    SH_ptr,  # (B, C) per-sample shift (HAS_MOD)
    SC_ptr,  # (B, C) per-sample scale (HAS_MOD)
    W_ptr,  # (C,) LN weight (HAS_WEIGHT)
    BIAS_ptr,  # (C,) LN bias (HAS_BIAS)
    R_ptr,  # (B, L, C) residual out x + [gate *] update (HAS_RESIDUAL)
    Y_ptr,  # (B, L, C) normalised out
    N, L,  # rows (= B * L), tokens per sample
    eps,
    stride_xb, stride_xl,
    stride_ub, stride_ul,
    stride_rb, stride_rl,
    stride_yb, stride_yl,
    stride_gb, stride_shb, stride_scb,
    C: tl.constexpr,  # row width
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,  # power-of-two parts, C0 + C1 + C2 >= C
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, ALIGN: tl.constexpr,
):
    tl.static_assert(C0 + C1 + C2 >= C)
    tl.static_assert(not HAS_GATE or HAS_RESIDUAL)
    # (s // A) * A: the divisibility the host checked, stated to the alignment analysis.
    stride_xb = stride_xb // ALIGN * ALIGN
    stride_xl = stride_xl // ALIGN * ALIGN
    stride_ub = stride_ub // ALIGN * ALIGN
    stride_ul = stride_ul // ALIGN * ALIGN
    stride_rb = stride_rb // ALIGN * ALIGN
    stride_rl = stride_rl // ALIGN * ALIGN
    stride_yb = stride_yb // ALIGN * ALIGN
    stride_yl = stride_yl // ALIGN * ALIGN
    stride_gb = stride_gb // ALIGN * ALIGN
    stride_shb = stride_shb // ALIGN * ALIGN
    stride_scb = stride_scb // ALIGN * ALIGN
    pid = tl.program_id(0)
    if HAS_MOD or HAS_GATE:
        # ROWS tokens of one sample: the sample's [C] modulation rows are loaded once, as vectors.
        n_blk = tl.cdiv(L, ROWS)
        b_scalar = pid // n_blk
        tok = (pid - b_scalar * n_blk) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = tok < L
        b = b_scalar.to(tl.int64)
        l = tok.to(tl.int64)
    else:
        # Consecutive rows of the flattened sequence (they may straddle two samples). Row indices fit
        # in int32 (the launcher checks N); offsets are int64: B * L * C exceeds 2**31.
        row = pid * ROWS + tl.arange(0, ROWS)
        row_ok = row < N
        b_row = row // L
        l = (row - b_row * L).to(tl.int64)
        b = b_row.to(tl.int64)
    X_rows = X_ptr + b * stride_xb + l * stride_xl  # (ROWS,) row pointers
    Y_rows = Y_ptr + b * stride_yb + l * stride_yl
    U_rows, R_rows, G_row, SH_row, SC_row = U_ptr, R_ptr, G_ptr, SH_ptr, SC_ptr  # None when absent
    if HAS_RESIDUAL:
        U_rows = U_ptr + b * stride_ub + l * stride_ul
        R_rows = R_ptr + b * stride_rb + l * stride_rl
    if HAS_GATE:
        G_row = G_ptr + b * stride_gb  # b is the program's one sample here
    if HAS_MOD:
        SH_row = SH_ptr + b * stride_shb
        SC_row = SC_ptr + b * stride_scb

    # LN of the fp32 residual (not of its rounded copy): one rounding fewer than the torch path.
    x0 = _residual_part(X_rows, U_rows, R_rows, G_row, row_ok, 0, C0, C, HAS_RESIDUAL, HAS_GATE)
    total = tl.sum(x0, axis=1)
    if C1 > 0:
        x1 = _residual_part(X_rows, U_rows, R_rows, G_row, row_ok, C0, C1, C, HAS_RESIDUAL, HAS_GATE)
        total += tl.sum(x1, axis=1)
    if C2 > 0:
        x2 = _residual_part(X_rows, U_rows, R_rows, G_row, row_ok, C0 + C1, C2, C, HAS_RESIDUAL, HAS_GATE)
        total += tl.sum(x2, axis=1)
    mean = total / C  # (ROWS,)
    x0 = _centered(x0, 0, C0, C, mean)
    sq = tl.sum(x0 * x0, axis=1)
    if C1 > 0:
        x1 = _centered(x1, C0, C1, C, mean)
        sq += tl.sum(x1 * x1, axis=1)
    if C2 > 0:
        x2 = _centered(x2, C0 + C1, C2, C, mean)
        sq += tl.sum(x2 * x2, axis=1)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    _output_part(Y_rows, row_ok, x0, rstd, W_ptr, BIAS_ptr, SH_row, SC_row, 0, C0, C, HAS_WEIGHT, HAS_BIAS,
                 HAS_MOD)
    if C1 > 0:
        _output_part(Y_rows, row_ok, x1, rstd, W_ptr, BIAS_ptr, SH_row, SC_row, C0, C1, C, HAS_WEIGHT,
                     HAS_BIAS, HAS_MOD)
    if C2 > 0:
        _output_part(Y_rows, row_ok, x2, rstd, W_ptr, BIAS_ptr, SH_row, SC_row, C0 + C1, C2, C, HAS_WEIGHT,
                     HAS_BIAS, HAS_MOD)


# ---------------------------------------------------------------------------------------------------
# host side

_THREADS = 128  # 4 warps per program, 8 for very wide rows
_MAX_ROWS = 32


def _split_row(C: int, vec: int) -> tuple[int, int, int]:
    """C -> (C0, C1, C2): power-of-two parts covering C, largest first, the last one padded when needed.

    A part narrower than max(vec, C0 // 8) would need so many rows per program (to give every thread a
    whole vector) that the wide part overflows the registers, so a smaller remainder is padded up to it.
    If the padded parts add up to the next power of two anyway, one part of that width is used.
    """
    c0 = 1 << (C.bit_length() - 1)
    smallest = max(vec, c0 // 8)
    parts, rest = [c0], C - c0
    while rest > 0:
        p = 1 << (rest.bit_length() - 1)
        if p < smallest or len(parts) == 2:  # the last part: pad the whole remainder
            parts.append(max(smallest, triton.next_power_of_2(rest)))
            break
        parts.append(p)
        rest -= p
    if sum(parts) >= triton.next_power_of_2(C):
        parts = [triton.next_power_of_2(C)]
    return tuple(parts + [0] * (3 - len(parts)))


def _launch_config(C: int, itemsize: int = 2) -> tuple[tuple[int, int, int], int, int]:
    """((C0, C1, C2), ROWS, num_warps) for rows of width C and elements of `itemsize` bytes.

    ROWS is chosen so that the narrowest part still covers every thread with one 16-byte vector (Triton
    narrows the per-thread vector when a tile has fewer elements than threads x vector) and each
    thread has at least two vectors in all; fewer threads for narrow parts keep ROWS <= 32.
    """
    vec = max(1, 16 // itemsize)
    parts = _split_row(C, vec)
    cpad = sum(parts)
    wmin = min(p for p in parts if p)
    threads = _THREADS
    while threads > 32 and threads * vec // wmin > _MAX_ROWS:
        threads //= 2
    if cpad // threads > 32:  # very wide rows: more threads rather than more registers per thread
        threads = 256
    rows = max(1, threads * vec // wmin, 2 * threads * vec // cpad)
    return parts, rows, threads // 32


def lane_use(C: int, itemsize: int = 2) -> float:
    """Fraction of the lanes (tile columns) holding real columns: C / (C0 + C1 + C2)."""
    return C / sum(_launch_config(C, itemsize)[0])


def _alignment(strides) -> int:
    """Largest power of two <= 16 dividing every stride (a compile-time hint for vector loads)."""
    a = 16
    while a > 1 and any(s % a for s in strides):
        a //= 2
    return a


def _as_3d(t):
    # (N, C) -> (1, N, C): one "sample" of N tokens; the per-sample operands then need B == 1.
    return t.unsqueeze(0) if t.dim() == 2 else t


def _check_bc(name, t, B, C):
    if t.shape != (B, C):
        raise ValueError(f"norm_fwd: {name} must be [B, C] = [{B}, {C}], got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"norm_fwd: {name} must have a contiguous last dim, got strides {t.stride()}")


def norm_fwd(x, *, eps, weight=None, bias=None, update=None, gate=None, shift=None, scale=None,
             out=None, residual_out=None):
    """Fused (residual add) + LayerNorm (+ affine) (+ per-sample modulation) over the last dim.

    x, update: [B, L, C] or [N, C], last dim contiguous, rows may be strided.
    gate, shift, scale: [B, C] (may be strided chunks of one [B, 6C] tensor); batch index = row // L.
    Returns (r, y) with r = x + [gate[b] *] update (None without update) and
    y = LN(r or x) [* weight] [+ bias] [* (1 + scale[b]) + shift[b]], both of x's dtype.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"norm_fwd: x must be [B, L, C] or [N, C], got {tuple(x.shape)}")
    if (shift is None) != (scale is None):
        raise ValueError("norm_fwd: shift and scale come together")
    if gate is not None and update is None:
        raise ValueError("norm_fwd: gate needs update")
    x3 = _as_3d(x)
    B, L, C = x3.shape
    operands = {"x": x, "update": update, "out": out, "residual_out": residual_out}
    for name, t in operands.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"norm_fwd: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"norm_fwd: {name} must have a contiguous last dim, got strides {t.stride()}")
        if t.device != x.device:
            raise ValueError(f"norm_fwd: {name} is on {t.device}, x on {x.device}")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is not None:
            _check_bc(name, t, B, C)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (C,) or t.stride(0) != 1):
            raise ValueError(f"norm_fwd: {name} must be a contiguous [{C}], got {tuple(t.shape)}")

    def new():
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    y = new() if out is None else out
    r = None
    if update is not None:
        r = new() if residual_out is None else residual_out
    u3 = _as_3d(update) if update is not None else None
    r3 = _as_3d(r) if r is not None else None
    y3 = _as_3d(y)
    N = B * L
    if N == 0 or C == 0:
        return r, y
    if N >= 2**31 - 2**16:
        raise ValueError(f"norm_fwd: {N} rows exceed the kernel's int32 row index")
    per_sample = shift is not None or gate is not None
    (c0, c1, c2), rows, num_warps = _launch_config(C, x.element_size())
    if per_sample:
        rows = min(rows, max(1, triton.next_power_of_2(L)))  # never more rows than a sample has
        n_programs = B * triton.cdiv(L, rows)
    else:
        n_programs = triton.cdiv(N, rows)

    def strides(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    row_strides = (*strides(x3), *strides(u3), *strides(r3), *strides(y3),
                   gate.stride(0) if gate is not None else 0,
                   shift.stride(0) if shift is not None else 0,
                   scale.stride(0) if scale is not None else 0)
    _norm_fwd_kernel[(n_programs,)](
        x3, u3, gate, shift, scale, weight, bias, r3, y3,
        N, L, float(eps), *row_strides,
        C=C, C0=c0, C1=c1, C2=c2,
        HAS_RESIDUAL=update is not None, HAS_GATE=gate is not None, HAS_MOD=shift is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS=rows, ALIGN=_alignment(row_strides), num_warps=num_warps,
    )
    return r, y


# Ahead-of-time compile specs: (flags of each op) at the widths of the shipped presets.
_AOT_OPS = {
    "norm.layer_norm": dict(HAS_RESIDUAL=False, HAS_GATE=False, HAS_MOD=False, HAS_WEIGHT=True,
                            HAS_BIAS=True),
    "norm.add_layer_norm": dict(HAS_RESIDUAL=True, HAS_GATE=False, HAS_MOD=False, HAS_WEIGHT=True,
                                HAS_BIAS=True),
    "norm.adaln": dict(HAS_RESIDUAL=False, HAS_GATE=False, HAS_MOD=True, HAS_WEIGHT=False, HAS_BIAS=False),
    "norm.gated_adaln": dict(HAS_RESIDUAL=True, HAS_GATE=True, HAS_MOD=True, HAS_WEIGHT=False,
                             HAS_BIAS=False),
}
_PTR_FLAGS = {"U_ptr": "HAS_RESIDUAL", "R_ptr": "HAS_RESIDUAL", "G_ptr": "HAS_GATE", "SH_ptr": "HAS_MOD",
              "SC_ptr": "HAS_MOD", "W_ptr": "HAS_WEIGHT", "BIAS_ptr": "HAS_BIAS"}
# Widths of the presets (DiT-S 384, U-ViT-S 512, DiT-B / U-ViT-M 768, DiT-L / U-ViT-L 1024, DiT-XL /
# U-ViT-H 1152) and the ends of the 64..4096 range, 72 for a part of 8 columns.
AOT_WIDTHS = (64, 72, 384, 512, 768, 1024, 1152, 4096)
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def aot_specs(dtypes=("bf16", "fp32"), widths=AOT_WIDTHS):
    """The launch configs as `triton.compile` inputs, for the ahead-of-time compile report.

    Mirrors the JIT for contiguous [B, L, C] inputs (B, L large): absent operands are constexpr None,
    pointers 16-byte aligned, integer arguments unspecialised, ALIGN from the row stride C (with the
    [B, 6C] adaLN chunks' stride 6C, which has at least C's alignment).
    """
    args = _norm_fwd_kernel.arg_names
    specs = []
    for dtype in dtypes:
        for kernel, flags in _AOT_OPS.items():
            for C in widths:
                (c0, c1, c2), rows, num_warps = _launch_config(C, _ITEMSIZE[dtype])
                constexprs = dict(flags, C=C, C0=c0, C1=c1, C2=c2, ROWS=rows, ALIGN=_alignment((C,)))
                signature, divisible = {}, []
                for i, name in enumerate(args):
                    if name in constexprs:
                        signature[name] = "constexpr"
                    elif name.endswith("_ptr"):
                        if name in _PTR_FLAGS and not flags[_PTR_FLAGS[name]]:
                            signature[name] = "constexpr"
                            constexprs[name] = None
                        else:
                            signature[name] = f"*{dtype}"
                            divisible.append(i)
                    elif name == "eps":
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i32"
                parts = "+".join(str(p) for p in (c0, c1, c2) if p)
                specs.append(dict(
                    kernel=kernel, config=f"{dtype} C={C} parts={parts} ROWS={rows} warps={num_warps}",
                    fn=_norm_fwd_kernel, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible},
                    num_warps=num_warps, num_stages=1,
                ))
    return specs

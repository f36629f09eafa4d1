"""Layer-norm family in one Triton kernel: plain LN, residual-add + LN, adaLN, gated adaLN.

`_norm_fwd_kernel` is specialised at compile time by HAS_RESIDUAL / HAS_GATE / HAS_MOD / HAS_WEIGHT /
HAS_BIAS, so each op of `duodiff_fast.ops.norm` is one pass over memory: read x (and update), write the
residual (when there is one) and y. Statistics are fp32; every output is cast once on store.
"""
import torch
import triton
import triton.language as tl


@triton.jit
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
    N, L, C,  # rows (= B * L), tokens per sample, row width
    eps,
    stride_xb, stride_xl,
    stride_ub, stride_ul,
    stride_rb, stride_rl,
    stride_yb, stride_yl,
    stride_gb, stride_shb, stride_scb,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tl.static_assert(BLOCK_C >= 16)
    tl.static_assert(not HAS_GATE or HAS_RESIDUAL)
    # Row indices fit in int32 (the launcher checks N); element offsets are int64 because
    # B * L * C exceeds 2**31 at large batch and width. int32 keeps the division cheap.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_ok = row < N
    b = row // L  # sample of each row; rows of one program may straddle two samples
    l = (row - b * L).to(tl.int64)
    b = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_C)
    c2 = cols[None, :]

    x = tl.load(X_ptr + (b * stride_xb + l * stride_xl)[:, None] + c2, mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    if HAS_RESIDUAL:
        u = tl.load(U_ptr + (b * stride_ub + l * stride_ul)[:, None] + c2, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        if HAS_GATE:
            # (B, C) modulation rows are re-read by all L tokens of a sample: leave them in cache.
            g = tl.load(G_ptr + (b * stride_gb)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
            u = g * u
        x = x + u
        tl.store(R_ptr + (b * stride_rb + l * stride_rl)[:, None] + c2,
                 x.to(R_ptr.dtype.element_ty), mask=mask)

    # LN of the fp32 residual (not of its rounded copy): one rounding fewer than the torch path.
    mean = tl.sum(x, axis=1) / C  # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        bb = tl.load(BIAS_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = y + bb[None, :]
    if HAS_MOD:
        sc = tl.load(SC_ptr + (b * stride_scb)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SH_ptr + (b * stride_shb)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + sc) + sh
    tl.store(Y_ptr + (b * stride_yb + l * stride_yl)[:, None] + c2, y.to(Y_ptr.dtype.element_ty), mask=mask)


def _launch_config(C):
    """(ROWS, BLOCK_C, num_warps) for rows of width C.

    Each program covers ~2K elements (several rows when C is small) so that a program moves enough
    bytes to hide latency, with ~8 elements (16 bytes of bf16) per thread and per tensor.
    """
    block_c = max(16, triton.next_power_of_2(C))
    rows = max(1, min(16, 2048 // block_c))
    num_warps = min(max(rows * block_c // 256, 1), 8)
    return rows, block_c, num_warps


def _as_3d(t):
    # (N, C) -> (1, N, C): one "sample" of N tokens; the per-sample operands then need B == 1.
    return t.unsqueeze(0) if t.dim() == 2 else t


def _check_bc(name, t, B, C):
    if t.shape != (B, C):
        raise ValueError(f"norm_fwd: {name} must be [B, C] = [{B}, {C}], got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"norm_fwd: {name} must have a contiguous last dim")


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
            raise ValueError(f"norm_fwd: {name} must have a contiguous last dim")
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
    if N == 0:
        return r, y
    if N >= 2**31 - 2**16:
        raise ValueError(f"norm_fwd: {N} rows exceed the kernel's int32 row index")
    rows, block_c, num_warps = _launch_config(C)

    def strides(t):
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    _norm_fwd_kernel[(triton.cdiv(N, rows),)](
        x3, u3, gate, shift, scale, weight, bias, r3, y3,
        N, L, C, float(eps),
        *strides(x3), *strides(u3), *strides(r3), *strides(y3),
        gate.stride(0) if gate is not None else 0,
        shift.stride(0) if shift is not None else 0,
        scale.stride(0) if scale is not None else 0,
        HAS_RESIDUAL=update is not None, HAS_GATE=gate is not None, HAS_MOD=shift is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
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


def aot_specs(dtype="bf16", widths=(1152, 512)):
    """Default launch configs as `triton.compile` inputs, for the ahead-of-time compile report.

    Mirrors what the JIT would see at run time for contiguous [B, L, C] inputs: absent operands are
    constexpr None, pointers are 16-byte aligned, and C and the row strides carry 16-divisibility when
    C is a multiple of 16, which is what lets the compiler vectorise the masked row loads.
    """
    args = _norm_fwd_kernel.arg_names
    specs = []
    for kernel, flags in _AOT_OPS.items():
        for C in widths:
            rows, block_c, num_warps = _launch_config(C)
            constexprs = dict(flags, ROWS=rows, BLOCK_C=block_c)
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
                    # Contiguous rows have stride C: 16-divisible exactly when C is.
                    if C % 16 == 0 and (name == "C" or name.startswith("stride_")):
                        divisible.append(i)
            specs.append(dict(
                kernel=kernel, config=f"{dtype} C={C} ROWS={rows} BLOCK_C={block_c} warps={num_warps}",
                fn=_norm_fwd_kernel, signature=signature, constexprs=constexprs,
                attrs={(i,): [["tt.divisibility", 16]] for i in divisible},
                num_warps=num_warps, num_stages=1,
            ))
    return specs

"""Early-exit confidence: mean over tokens l >= start and K outputs of sigmoid(h[b, l] @ W + bias).

One read of h. Deterministic without float atomics: stage 1 writes one fp32 partial sum per
(sample, block of tokens); stage 2 adds each sample's partials in a fixed order.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _exit_confidence_fwd_kernel(
    H_ptr,  # (B, L, C) hidden states, last dim contiguous
    W_ptr,  # (C, K) probe / map weight, any strides
    BIAS_ptr,  # (K,)
    P_ptr,  # (B, n_blocks) fp32 partial sums of sigmoid(z)
    L, C, K, start,
    stride_hb, stride_hl,
    stride_wc, stride_wk,
    stride_pb,
    USE_DOT: tl.constexpr,  # K > 1: z on tensor cores; K == 1: a row dot product on CUDA cores
    DOT_PRECISION: tl.constexpr,  # "tf32" when h is 16-bit (exact in tf32), "tf32x3" for fp32 h
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(USE_DOT or BLOCK_K == 1)
    tl.static_assert(not USE_DOT or (BLOCK_L >= 16 and BLOCK_C >= 16 and BLOCK_K >= 16))
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    toks = start + blk * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    tok_ok = toks < L
    h_rows = H_ptr + b * stride_hb + toks.to(tl.int64)[:, None] * stride_hl  # (BLOCK_L, 1)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K

    if USE_DOT:
        acc = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    else:
        # Keep per-lane products and reduce once after the loop (one cross-thread reduction).
        acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        h = tl.load(h_rows + cs[None, :], mask=tok_ok[:, None] & c_ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)  # (BLOCK_L, BLOCK_C)
        if USE_DOT:
            w = tl.load(W_ptr + cs[:, None] * stride_wc + ks[None, :] * stride_wk,
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_K)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        else:
            w = tl.load(W_ptr + cs * stride_wc, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
            acc += h * w[None, :]
    if USE_DOT:
        z = acc  # (BLOCK_L, BLOCK_K)
    else:
        z = tl.sum(acc, axis=1)[:, None]  # (BLOCK_L, 1)
    bias = tl.load(BIAS_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    z = z + bias[None, :]
    # Padded tokens and outputs would add sigmoid(0) = 0.5: zero them before summing.
    s = tl.where(tok_ok[:, None] & k_ok[None, :], tl.sigmoid(z), 0.0)
    part = tl.sum(tl.sum(s, axis=1), axis=0)
    tl.store(P_ptr + b * stride_pb + blk, part)


@triton.jit
def _exit_confidence_reduce_kernel(
    P_ptr,  # (B, n_blocks) fp32 partial sums
    O_ptr,  # (B,) fp32 mean
    n_blocks, count,  # count = (L - start) * K, as fp32
    stride_pb,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_blocks, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(P_ptr + b * stride_pb + idx, mask=idx < n_blocks, other=0.0)
    tl.store(O_ptr + b, tl.sum(acc, axis=0) / count)


# Enough programs to cover every SM of an H100 (132) about twice before shrinking token blocks further.
_MIN_PROGRAMS = 264


def _launch_config(B, n_tok, K):
    """(USE_DOT, BLOCK_L, BLOCK_C, BLOCK_K, num_warps) for B samples of n_tok tokens and K outputs."""
    use_dot = K > 1
    block_k = max(16, triton.next_power_of_2(K)) if use_dot else 1
    block_l = 64 if use_dot else 32
    # Memory-bound: small batches need shorter token blocks to keep all SMs reading.
    while block_l > 16 and B * triton.cdiv(n_tok, block_l) < _MIN_PROGRAMS:
        block_l //= 2
    block_c = 64 if use_dot else 128
    return use_dot, block_l, block_c, block_k, 4


def exit_confidence_fwd(h, weight, bias, start=0):
    """h: [B, L, C] (last dim contiguous), weight: [C, K], bias: [K] -> [B] float32 confidence."""
    if h.dim() != 3 or h.stride(-1) != 1:
        raise ValueError(f"exit_confidence_fwd: h must be [B, L, C] with a contiguous last dim, "
                         f"got shape {tuple(h.shape)} strides {h.stride()}")
    B, L, C = h.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"exit_confidence_fwd: weight must be [C={C}, K], got {tuple(weight.shape)}")
    K = weight.shape[1]
    if bias.shape != (K,):
        raise ValueError(f"exit_confidence_fwd: bias must be [K={K}], got {tuple(bias.shape)}")
    if not 0 <= start < L:
        raise ValueError(f"exit_confidence_fwd: need 0 <= start < L={L}, got start={start}")
    if K == 0 or B == 0:
        raise ValueError(f"exit_confidence_fwd: empty problem B={B}, K={K}")
    n_tok = L - start
    use_dot, block_l, block_c, block_k, num_warps = _launch_config(B, n_tok, K)
    n_blocks = triton.cdiv(n_tok, block_l)
    partial = torch.empty(B, n_blocks, device=h.device, dtype=torch.float32)
    out = torch.empty(B, device=h.device, dtype=torch.float32)
    precision = "tf32x3" if h.dtype == torch.float32 else "tf32"
    _exit_confidence_fwd_kernel[(n_blocks, B)](
        h, weight, bias, partial,
        L, C, K, start,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), partial.stride(0),
        USE_DOT=use_dot, DOT_PRECISION=precision,
        BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
    )
    _exit_confidence_reduce_kernel[(B,)](
        partial, out, n_blocks, float(n_tok * K), partial.stride(0),
        BLOCK=min(1024, max(16, triton.next_power_of_2(n_blocks))), num_warps=1,
    )
    return out


def aot_specs(dtype="bf16", widths=(1152, 512), ks=(1, 12)):
    """Default launch configs as `triton.compile` inputs, for the ahead-of-time compile report.

    Large-batch configs (B=128, L=257); pointers, C and row strides carry the 16-divisibility the
    JIT would see at those shapes.
    """
    specs = []
    fn = _exit_confidence_fwd_kernel
    for C in widths:
        for K in ks:
            use_dot, block_l, block_c, block_k, num_warps = _launch_config(128, 257, K)
            precision = "tf32x3" if dtype == "fp32" else "tf32"
            constexprs = dict(USE_DOT=use_dot, DOT_PRECISION=precision,
                              BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k)
            # The JIT turns integer arguments equal to 1 into constexprs: weight's column stride
            # (contiguous [C, K]), and K and its row stride when K == 1.
            ints = {"L": "i32", "C": "i32", "K": "i32", "start": "i32", "stride_hb": "i32",
                    "stride_hl": "i32", "stride_wc": "i32", "stride_wk": "i32", "stride_pb": "i32"}
            constexprs.update(stride_wk=1)
            if K == 1:
                constexprs.update(K=1, stride_wc=1)
            signature = {"H_ptr": f"*{dtype}", "W_ptr": f"*{dtype}", "BIAS_ptr": f"*{dtype}",
                         "P_ptr": "*fp32"}
            signature.update({k: ("constexpr" if k in constexprs else v) for k, v in ints.items()})
            signature.update({k: "constexpr" for k in ("USE_DOT", "DOT_PRECISION", "BLOCK_L", "BLOCK_C",
                                                       "BLOCK_K")})
            divisible = ["H_ptr", "W_ptr", "BIAS_ptr", "P_ptr"]
            if C % 16 == 0:
                divisible += ["C", "stride_hb", "stride_hl"]
            if K % 16 == 0:
                divisible.append("stride_wc")
            specs.append(dict(
                kernel="exit_confidence",
                config=f"{dtype} C={C} K={K} BLOCK_L={block_l} BLOCK_C={block_c} BLOCK_K={block_k} "
                       f"dot={'tf32' if use_dot else 'no'} warps={num_warps}",
                fn=fn, signature=signature, constexprs=constexprs,
                attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible
                       if signature[n] != "constexpr"},
                num_warps=num_warps, num_stages=3,
            ))
    specs.append(dict(
        kernel="exit_confidence.reduce", config="BLOCK=16 warps=1", fn=_exit_confidence_reduce_kernel,
        signature={"P_ptr": "*fp32", "O_ptr": "*fp32", "n_blocks": "i32", "count": "fp32", "stride_pb": "i32",
                   "BLOCK": "constexpr"},
        constexprs={"BLOCK": 16}, attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
        num_warps=1, num_stages=1,
    ))
    return specs

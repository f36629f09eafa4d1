"""Early-exit confidence: mean over tokens l >= start and K outputs of sigmoid(h[b, l] @ W + bias).

One read of h. Deterministic without float atomics: stage 1 writes one fp32 partial sum per
(sample, block of tokens); stage 2 adds each sample's partials in a fixed order. Batch-invariant: the
tile sizes depend on K only, never on B, so a sample's confidence is bitwise the same
whichever batch it is computed in (an early exit at a threshold must not depend on the batch size).

Dot precision (K > 1, z on tensor cores): both operands are upcast to fp32 in registers, and
`input_precision` is chosen from both dtypes: "tf32" only when h and weight are both 16-bit (fp16 and
bf16 values are exact in tf32, so nothing is rounded), "tf32x3" as soon as either is fp32 (an fp32
weight rounded to tf32 would lose 13 bits silently; tf32x3 keeps ~fp32 accuracy on tensor cores).
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
    DOT_PRECISION: tl.constexpr,  # "tf32" when h and weight are 16-bit (exact in tf32), else "tf32x3"
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(USE_DOT or BLOCK_K == 1)
    tl.static_assert(not USE_DOT or (BLOCK_L >= 16 and BLOCK_C >= 16 and BLOCK_K >= 16))
    b = tl.program_id(0).to(tl.int64)  # samples on axis 0: no 65,535 limit on the batch
    blk = tl.program_id(1)
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


def _launch_config(K):
    """(USE_DOT, BLOCK_L, BLOCK_C, BLOCK_K, num_warps) for K outputs.

    Independent of the batch size on purpose (the summation order, hence the bits of each sample's
    result, follows from these sizes). Short token blocks keep a small batch's SMs busy at 16 tokens per
    program for the probe (K = 1; about 2 * 16 * C bytes each); the tensor-core path takes 64 tokens so
    that the [C, K] weight, re-read by every program, stays small next to the h it serves.
    """
    use_dot = K > 1
    block_k = max(16, triton.next_power_of_2(K)) if use_dot else 1
    block_l = 64 if use_dot else 16
    block_c = 64 if use_dot else 128
    return use_dot, block_l, block_c, block_k, 4


def _dot_precision(h_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """"tf32" when both operands are 16-bit (exact in tf32); "tf32x3" when either is fp32."""
    return "tf32" if h_dtype.itemsize <= 2 and w_dtype.itemsize <= 2 else "tf32x3"


def exit_confidence_fwd(h, weight, bias, start=0):
    """h: [B, L, C] (last dim contiguous), weight: [C, K], bias: [K] -> [B] float32 confidence.

    B = 0 gives an empty [0] result, like torch. Each sample's value does not depend on B.
    """
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
    if K == 0:
        raise ValueError(f"exit_confidence_fwd: weight has K=0 outputs (shape {tuple(weight.shape)}); "
                         "the mean over K outputs needs K >= 1")
    out = torch.empty(B, device=h.device, dtype=torch.float32)
    if B == 0:
        return out
    n_tok = L - start
    use_dot, block_l, block_c, block_k, num_warps = _launch_config(K)
    n_blocks = triton.cdiv(n_tok, block_l)
    # Samples on grid axis 0 (up to 2**31 - 1), token blocks on axis 1 (at most 65535: L - start below
    # about a million tokens).
    if B > 2**31 - 1:
        raise ValueError(f"exit_confidence_fwd: batch {B} exceeds the 2**31 - 1 programs of grid axis 0")
    if n_blocks > 65535:
        raise ValueError(f"exit_confidence_fwd: L - start = {n_tok} tokens need {n_blocks} blocks, more than "
                         "the 65535 of grid axis 1")
    partial = torch.empty(B, n_blocks, device=h.device, dtype=torch.float32)
    _exit_confidence_fwd_kernel[(B, n_blocks)](
        h, weight, bias, partial,
        L, C, K, start,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), partial.stride(0),
        USE_DOT=use_dot, DOT_PRECISION=_dot_precision(h.dtype, weight.dtype),
        BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
    )
    _exit_confidence_reduce_kernel[(B,)](
        partial, out, n_blocks, float(n_tok * K), partial.stride(0),
        BLOCK=min(1024, max(16, triton.next_power_of_2(n_blocks))), num_warps=1,
    )
    return out


def aot_specs(dtype="bf16", widths=(1152, 512), ks=(1, 12), weight_dtype=None):
    """Launch configs as `triton.compile` inputs, for the ahead-of-time compile report (they do not
    depend on B or L); pointers, C and row strides carry the 16-divisibility the JIT sees at the shipped
    widths. `weight_dtype` defaults to h's."""
    specs = []
    fn = _exit_confidence_fwd_kernel
    for C in widths:
        for K in ks:
            use_dot, block_l, block_c, block_k, num_warps = _launch_config(K)
            wdt = weight_dtype or dtype
            precision = "tf32" if dtype != "fp32" and wdt != "fp32" else "tf32x3"
            constexprs = dict(USE_DOT=use_dot, DOT_PRECISION=precision,
                              BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k)
            # The JIT turns integer arguments equal to 1 into constexprs: weight's column stride
            # (contiguous [C, K]), and K and its row stride when K == 1.
            ints = {"L": "i32", "C": "i32", "K": "i32", "start": "i32", "stride_hb": "i32",
                    "stride_hl": "i32", "stride_wc": "i32", "stride_wk": "i32", "stride_pb": "i32"}
            constexprs.update(stride_wk=1)
            if K == 1:
                constexprs.update(K=1, stride_wc=1)
            signature = {"H_ptr": f"*{dtype}", "W_ptr": f"*{wdt}", "BIAS_ptr": f"*{wdt}",
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
                config=f"{dtype}{'' if wdt == dtype else '/w ' + wdt} C={C} K={K} BLOCK_L={block_l} "
                       f"BLOCK_C={block_c} BLOCK_K={block_k} dot={precision if use_dot else 'no'} warps={num_warps}",
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

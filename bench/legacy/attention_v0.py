"""The attention kernel as it was before the issue-9 fix (commit 6bf54bb), kept only for comparisons.

Not dispatched to: `duodiff_fast.ops` uses kernels/attention.py. This copy exists so that the kernel
benchmark can time the old and the fixed kernel in the same run on a GPU (provider `triton-v0`) and the
compile report can show the old SASS beside the new (`--kernels attention_v0`). Its known faults, fixed
in attention.py: a masked remainder *loop* after the wgmma main loop, which makes ptxas serialize the
tensor-core chain in most sm_90a candidates (warning C7515); a 2-D grid whose axis 1 (B*H) stops at
65,535; tail programs interleaved with full ones; an autotune key without B*H. See attention.py for the
design notes, which apply here too.
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, n_rows, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a [rows, cols] tile at `ptr` (row 0 of the tile); zero outside the valid region."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=offs_c[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptr, x, offs_r, offs_c, stride_r, n_rows, HEAD_DIM: tl.constexpr,
                MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < HEAD_DIM))
        else:
            tl.store(ptrs, x, mask=offs_r[:, None] < n_rows)
    else:
        if MASK_COLS:
            tl.store(ptrs, x, mask=offs_c[None, :] < HEAD_DIM)
        else:
            tl.store(ptrs, x)


@triton.jit
def _attention_fwd_block(acc0, acc1, m_i, l_i, q0, q1, K_ptr, V_ptr, start_n, stride_l, L, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                         BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) of the online softmax for one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    row = tl.cast(start_n, tl.int64) * stride_l  # int64: the scalar part of the address carries the size
    n_keys = L - start_n
    k0 = _load_tile(K_ptr + row, offs_n, offs_d0, stride_l, n_keys, HEAD_DIM, MASK_N, BLOCK_D0 > HEAD_DIM)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # (M, N) fp32
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(K_ptr + row, offs_n, offs_d1, stride_l, n_keys, HEAD_DIM, MASK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    if MASK_N:
        s = tl.where(offs_n[None, :] < n_keys, s, float("-inf"))
    # qk_scale = scale * log2(e) > 0, so the max commutes with the scaling; the block always holds
    # at least one valid key, so m_new is finite and exp2(-inf - m_new) = 0 for masked keys.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(V_ptr + row, offs_n, offs_d0, stride_l, n_keys, HEAD_DIM, MASK_N, BLOCK_D0 > HEAD_DIM)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        v1 = _load_tile(V_ptr + row, offs_n, offs_d1, stride_l, n_keys, HEAD_DIM, MASK_N,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attention_fwd_tile(Q_ptr, K_ptr, V_ptr, O_ptr, start_m, stride_l, stride_ol, L, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                        MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Rows [start_m, start_m + BLOCK_M) of one (batch, head): all keys, then the store."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    n_rows = L - start_m
    q_row = tl.cast(start_m, tl.int64) * stride_l
    q0 = _load_tile(Q_ptr + q_row, offs_m, offs_d0, stride_l, n_rows, HEAD_DIM, MASK_M, BLOCK_D0 > HEAD_DIM)
    q1 = 0.0  # unused placeholder when the head dim is a power of two
    acc1 = 0.0
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(Q_ptr + q_row, offs_m, offs_d1, stride_l, n_rows, HEAD_DIM, MASK_M,
                        BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # aligned part: no masks at all
        acc0, acc1, m_i, l_i = _attention_fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, K_ptr, V_ptr, start_n, stride_l, L, qk_scale,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, False, DOT_PRECISION)
    for start_n in range(n_full, L, TAIL_N):  # remainder keys in small masked blocks
        acc0, acc1, m_i, l_i = _attention_fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, K_ptr, V_ptr, start_n, stride_l, L, qk_scale,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, TAIL_N, True, DOT_PRECISION)

    inv_l = 1.0 / l_i
    o_row = tl.cast(start_m, tl.int64) * stride_ol
    o0 = (acc0 * inv_l[:, None]).to(O_ptr.dtype.element_ty)
    _store_tile(O_ptr + o_row, o0, offs_m, offs_d0, stride_ol, n_rows, HEAD_DIM, MASK_M, BLOCK_D0 > HEAD_DIM)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        o1 = (acc1 * inv_l[:, None]).to(O_ptr.dtype.element_ty)
        _store_tile(O_ptr + o_row, o1, offs_m, offs_d1, stride_ol, n_rows, HEAD_DIM, MASK_M,
                    BLOCK_D0 + BLOCK_D1 > HEAD_DIM)


@triton.jit
def _attention_fwd_kernel(
    QKV_ptr, O_ptr,
    stride_qb, stride_ql, stride_q3, stride_qh,  # qkv (B, L, 3, H, D), stride of D is 1
    stride_ob, stride_ol,  # out (B, L, H*D), stride of H*D is 1
    H, L, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (L // BLOCK_M + ceil((L % BLOCK_M) / TAIL_M), B * H). ALIGN: a power of two dividing every
    stride, so loads vectorise (e.g. 8 for D=72, whose strides the JIT does not mark 16-divisible)."""
    tl.static_assert(TAIL_M >= 16 and TAIL_N >= 16 and BLOCK_D0 >= 16)
    tl.static_assert(BLOCK_D1 == 0 or BLOCK_D1 >= 16)
    # tl.multiple_of does not stick to kernel arguments; (s // A) * A states the same divisibility
    # to the alignment analysis (exact, since the host checked A | s) for two scalar ops.
    stride_qb = stride_qb // ALIGN * ALIGN
    stride_ql = stride_ql // ALIGN * ALIGN
    stride_q3 = stride_q3 // ALIGN * ALIGN
    stride_qh = stride_qh // ALIGN * ALIGN
    stride_ob = stride_ob // ALIGN * ALIGN
    stride_ol = stride_ol // ALIGN * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_ptr = QKV_ptr + b * stride_qb + h * stride_qh
    k_ptr = q_ptr + stride_q3
    v_ptr = k_ptr + stride_q3
    o_ptr = O_ptr + b * stride_ob + h * HEAD_DIM
    n_main = L // BLOCK_M
    if pid_m < n_main:
        _attention_fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, pid_m * BLOCK_M, stride_ql, stride_ol, L, qk_scale,
                            HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, BLOCK_N, TAIL_N, False, DOT_PRECISION)
    else:
        start_m = n_main * BLOCK_M + (pid_m - n_main) * TAIL_M
        _attention_fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, start_m, stride_ql, stride_ol, L, qk_scale,
                            HEAD_DIM, BLOCK_D0, BLOCK_D1, TAIL_M, BLOCK_N, TAIL_N, True, DOT_PRECISION)


# ---------------------------------------------------------------------------------------------------
# host side


def _split_head_dim(D: int) -> tuple[int, int]:
    """D -> (BLOCK_D0, BLOCK_D1): a power of two >= 16 plus a masked remainder padded to a power of two
    >= 16 (0 if none). 72 -> (64, 16), 96 -> (64, 32), 64 -> (64, 0)."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


def _alignment(strides) -> int:
    """Largest power of two <= 16 dividing every stride (a compile-time hint for vector loads)."""
    a = 16
    while a > 1 and any(s % a for s in strides):
        a //= 2
    return a


def _tail_sizes(L: int, bm: int, bn: int) -> tuple[int, int]:
    """(TAIL_M, TAIL_N): the remainders L % bm and L % bn rounded up to a power of two >= 16, so each
    remainder costs exactly one masked tile (16 for L = 2^k + 1 or 2)."""
    def tail(r, block):
        return min(block, max(16, triton.next_power_of_2(r)))
    return tail(L % bm, bm), tail(L % bn, bn)


def _config(bm, bn, warps, stages, L=None):
    tail_m, tail_n = _tail_sizes(L, bm, bn) if L is not None else (16, 16)
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TAIL_M": tail_m, "TAIL_N": tail_n},
                         num_warps=warps, num_stages=stages)


# Candidates (BLOCK_M, BLOCK_N, warps, stages) per dtype class and computed head dim (BLOCK_D0 +
# BLOCK_D1), pruned by L. The first of each 16-bit list is the sm_90 default of the compile report
# (wgmma, no spills); the others cover sm_80 and long sequences.
_CANDIDATES_16BIT_SMALL_D = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 2),
                             (64, 64, 4, 3)]
_CANDIDATES_16BIT_MID_D = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
_CANDIDATES_16BIT_LARGE_D = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 2), (64, 64, 4, 3)]
_CANDIDATES_FP32 = [(64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2)]
_CANDIDATE_INTERPRETER = (64, 64, 4, 1)  # the interpreter ignores warps/stages; big tiles run faster


def _candidates(D: int, dtype: torch.dtype) -> list:
    if dtype == torch.float32:
        return _CANDIDATES_FP32
    d0, d1 = _split_head_dim(D)
    if d0 + d1 <= 64:
        return _CANDIDATES_16BIT_SMALL_D
    if d0 + d1 <= 96:
        return _CANDIDATES_16BIT_MID_D
    return _CANDIDATES_16BIT_LARGE_D


def _prune(configs, named_args, **kwargs):
    """The candidates of this (D, dtype) whose tiles are not longer than the sequence, each with the tail
    sizes of this L (L is in the tuning key, so the tuned config carries the right tails)."""
    L = named_args["L"]
    cands = _candidates(kwargs["HEAD_DIM"], named_args["QKV_ptr"].dtype)
    fit = [c for c in cands if c[0] <= max(L, 64) and c[1] <= max(L, 64)]
    fit = fit or [min(cands, key=lambda c: c[0] * c[1])]
    return [_config(*c, L=L) for c in fit]


def _all_configs():
    seen, out = set(), []
    for c in (_CANDIDATES_16BIT_SMALL_D + _CANDIDATES_16BIT_MID_D + _CANDIDATES_16BIT_LARGE_D
              + _CANDIDATES_FP32):
        if c not in seen:
            seen.add(c)
            out.append(_config(*c))
    return out


_tuned_kernel = None


def _kernel_and_config(L: int):
    """(kernel, fixed config or None). One fixed config under the interpreter; autotuned on a GPU,
    keyed by (L, HEAD_DIM) plus the dtypes of qkv and out (the autotuner appends tensor dtypes)."""
    global _tuned_kernel
    if triton.knobs.runtime.interpret:
        return _attention_fwd_kernel, _config(*_CANDIDATE_INTERPRETER, L=L)
    if _tuned_kernel is None:
        tune = triton.autotune(configs=_all_configs(), key=["L", "HEAD_DIM"],
                               prune_configs_by={"early_config_prune": _prune})
        _tuned_kernel = tune(_attention_fwd_kernel)
    return _tuned_kernel, None


def _check(qkv: torch.Tensor, out: torch.Tensor | None) -> None:
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_fwd: qkv must be [B, L, 3, H, D], got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"attention_fwd: the last dim of qkv must be contiguous, got strides {qkv.stride()}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention_fwd: dtype {qkv.dtype} not supported (fp16, bf16, fp32)")
    if not 1 <= qkv.shape[-1] <= 256:
        raise ValueError(f"attention_fwd: head dim {qkv.shape[-1]} not supported (1..256)")
    if out is not None:
        B, L, _, H, D = qkv.shape
        if out.shape != (B, L, H * D) or out.dtype != qkv.dtype or out.device != qkv.device:
            raise ValueError(f"attention_fwd: out must be {qkv.dtype} [{B}, {L}, {H * D}] on {qkv.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError(f"attention_fwd: the last dim of out must be contiguous, got {out.stride()}")


def attention_fwd(qkv: torch.Tensor, scale: float | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for packed `qkv` [B, L, 3, H, D] -> [B, L, H*D] in qkv's dtype.

    `scale` defaults to D**-0.5 and must be positive. On a GPU the first call for a new (L, D, dtype)
    autotunes (it benchmarks, so it must not happen inside a CUDA-graph capture): call `warmup` first.
    """
    _check(qkv, out)
    if not qkv.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError("attention_fwd: qkv must be a CUDA tensor (or run under TRITON_INTERPRET=1)")
    B, L, _, H, D = qkv.shape
    scale = D ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"attention_fwd: scale must be positive, got {scale}")
    if out is None:
        out = torch.empty((B, L, H * D), device=qkv.device, dtype=qkv.dtype)
    if B * H == 0 or L == 0:
        return out
    d0, d1 = _split_head_dim(D)
    kernel, config = _kernel_and_config(L)

    def grid(meta):
        n_main = L // meta["BLOCK_M"]
        return (n_main + triton.cdiv(L - n_main * meta["BLOCK_M"], meta["TAIL_M"]), B * H)

    args = (qkv, out, *qkv.stride()[:4], *out.stride()[:2], H, L, scale * math.log2(math.e))
    strides = qkv.stride()[:4] + out.stride()[:2]
    meta = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, ALIGN=_alignment(strides),
                DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32")
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **config.all_kwargs())
    return out


def warmup(qkv_shape, dtype: torch.dtype, device) -> None:
    """Compile and autotune for this (L, D, dtype) now, so a later CUDA-graph capture never tunes."""
    qkv = torch.randn(qkv_shape, dtype=dtype, device=device)
    attention_fwd(qkv)
    if qkv.is_cuda:
        torch.cuda.synchronize(qkv.device)


def aot_specs(dtypes=("bf16", "fp16"), head_dims=(32, 48, 64, 72, 80, 96, 128)) -> list[dict]:
    """The old kernel for every candidate of every (dtype, head dim), L=257 tails (16 x 16), with the
    divisibility the old JIT gave 16-divisible strides (the old kernel specialised integer arguments)."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("aot_specs: the kernels were built for the interpreter (TRITON_INTERPRET=1 at "
                           "import); compile in a process without it")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    specs = []
    names = _attention_fwd_kernel.arg_names
    for dtype in dtypes:
        for D in head_dims:
            d0, d1 = _split_head_dim(D)
            for bm, bn, warps, stages in _candidates(D, dt[dtype]):
                signature = {"QKV_ptr": f"*{dtype}", "O_ptr": f"*{dtype}",
                             "stride_qb": "i32", "stride_ql": "i32", "stride_q3": "i32", "stride_qh": "i32",
                             "stride_ob": "i32", "stride_ol": "i32", "H": "i32", "L": "i32", "qk_scale": "fp32"}
                tail_m, tail_n = _tail_sizes(257, bm, bn)
                constexprs = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=bm, BLOCK_N=bn,
                                  TAIL_M=tail_m, TAIL_N=tail_n, ALIGN=_alignment((D,)),
                                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
                signature.update({k: "constexpr" for k in constexprs})
                divisible = ["QKV_ptr", "O_ptr", "stride_qb", "stride_ql", "stride_q3", "stride_ob", "stride_ol"]
                divisible += ["stride_qh"] if D % 16 == 0 else []  # stride_qh == D
                specs.append(dict(
                    kernel="attention_v0",
                    config=f"{dtype} D{D} BM{bm} BN{bn} w{warps} s{stages} tail{tail_m}x{tail_n}",
                    fn=_attention_fwd_kernel, signature=signature, constexprs=constexprs,
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
                    num_warps=warps, num_stages=stages))
    return specs

// Host API of the csrc/ kernels: one params struct and one launcher per op. Plain C++ (no torch, no
// device code): bindings.cpp fills the structs from validated tensors, the emulator tests from ctypes.
//
// Launchers pick the kernel configuration from the shapes, launch on `stream` and return nullptr on
// success or a static message saying what was wrong (an unsupported shape, a CUDA launch error).
// Pointers are device pointers; strides are in elements; the last dim of every tensor is contiguous.
#pragma once

#include <cstdint>

#ifdef DUODIFF_EMULATE
using cudaStream_t = void*;
#else
#include <cuda_runtime_api.h>
#endif

namespace duo {

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// ---- attention: softmax(q k^T * scale) v, packed qkv [B, L, 3, H, D] -> out [B, L, H*D] ----
struct AttentionParams {
  const void* qkv = nullptr;
  void* out = nullptr;
  DType dtype = DType::kF16;  // f16 or bf16, qkv and out alike
  int64_t B = 0, L = 0, H = 0, D = 0;
  int64_t stride_qb = 0, stride_ql = 0, stride_q3 = 0, stride_qh = 0;  // of qkv
  int64_t stride_ob = 0, stride_ol = 0;                                // of out
  float scale = 0.f;                                                   // > 0
};
// The head dims the kernel is compiled for, and what the launcher needs of pointers and strides.
bool attention_head_dim_supported(int64_t D);
constexpr int kAttentionAlignElems = 8;  // every stride a multiple of 8 elements, pointers 16-byte aligned
const char* attention_fwd(const AttentionParams& p, cudaStream_t stream);

// ---- norm family: r = x [+ gate[b] *] update;  y = LN(r) [* w] [+ bias] [* (1 + scale[b]) + shift[b]] ----
struct NormOperand {  // an optional per-channel ([C]) or per-sample ([B, C]) operand
  const void* ptr = nullptr;
  DType dtype = DType::kF32;  // the row dtype (x's) or kF32
  int64_t stride_b = 0;       // per-sample operands: stride between samples; per-channel: unused
};
struct NormParams {
  const void* x = nullptr;
  const void* update = nullptr;  // null: no residual add
  void* out = nullptr;
  void* residual_out = nullptr;  // required when update is given
  DType dtype = DType::kF16;     // x, update, out, residual_out
  NormOperand weight, bias, gate, shift, scale;  // gate needs update; shift and scale come together
  int64_t B = 0, L = 0, C = 0;                   // rows = B * L, each of width C
  int64_t stride_xb = 0, stride_xl = 0, stride_ub = 0, stride_ul = 0;
  int64_t stride_ob = 0, stride_ol = 0, stride_rb = 0, stride_rl = 0;
  float eps = 1e-5f;
};
constexpr int64_t kNormMaxC = 32768;
const char* norm_fwd(const NormParams& p, cudaStream_t stream);

// ---- exit confidence: out[b] = mean over l >= start, k < K of sigmoid(h[b, l] . w[:, k] + bias[k]) ----
struct ExitParams {
  const void* h = nullptr;
  DType h_dtype = DType::kF16;
  const void* weight = nullptr;  // [C, K], any strides
  DType w_dtype = DType::kF16;
  const void* bias = nullptr;  // [K]
  DType bias_dtype = DType::kF16;
  float* out = nullptr;        // [B] fp32
  float* workspace = nullptr;  // exit_confidence_workspace(p) floats
  int64_t B = 0, L = 0, C = 0, K = 0, start = 0;
  int64_t stride_hb = 0, stride_hl = 0, stride_wc = 0, stride_wk = 0, stride_bias = 1, stride_out = 1;
};
// Whether the tensor-core path takes these inputs, and what it needs of the weight (rows of the
// [K, C] transpose contiguous and 16-byte aligned), so the binding can hand it a suitable copy.
bool exit_confidence_uses_mma(const ExitParams& p);
bool exit_confidence_weight_ok_for_mma(const ExitParams& p);
int64_t exit_confidence_workspace(const ExitParams& p);
const char* exit_confidence_fwd(const ExitParams& p, cudaStream_t stream);

}  // namespace duo

// Layer-norm family in one templated kernel: layer_norm, add_layer_norm, adaln, gated_adaln.
//
//   r = x [+ gate[b] * update]                     (RES: written to residual_out, in x's dtype)
//   y = LN(r) [* weight] [+ bias] [* (1 + scale[b]) + shift[b]]   (MOD: per-sample modulation)
//
// Statistics in fp32, two-pass over registers (mean, then the mean of squared deviations: no
// cancellation), of the fp32 residual rather than its rounded copy. One read of x / update, one write
// of r / y. Compile-time: the element type, RES, MOD and the row layout; run-time (warp-uniform
// branches): whether gate, weight and bias are present and whether each operand is fp32 or x's dtype.
//
// Fast path: 16-byte vector loads and stores. The launch shape comes from C: a row is split across
// TPR threads (8, 16 or 32 lanes of a warp, several rows per 128-thread block, shuffle reductions),
// or across a block of 2..16 warps for wide rows (shuffles, then shared memory); each thread holds at
// most kMaxVecs vectors of the row in registers. Scalar path (C or a pointer / stride not 16-byte
// aligned): one block per row, the fp32 row staged in shared memory, element-wise loads.
// Rows are [B, L] with strides; per-sample operands ([B, C]) have their own sample stride, so the
// chunks of DiT's [B, 6C] adaLN output are read in place. In-place residual (residual_out = x) is safe:
// every element is read before it is written, by the same thread.
#include "common.cuh"

namespace duo {
namespace {

constexpr int kMaxVecs = 4;  // 16-byte vectors per thread and row (32 fp32 values of a 16-bit row)
constexpr int kRowBlock = 128;
constexpr int kMaxRowWarps = 16;  // block-per-row layout: up to 512 threads (<= 128 registers each)

enum OperandBit : uint32_t { kWeightF32 = 1, kBiasF32 = 2, kGateF32 = 4, kShiftF32 = 8, kScaleF32 = 16 };

struct NormArgs {
  const void* x;
  const void* u;
  void* y;
  void* r;
  const void* w;
  const void* bias;
  const void* gate;
  const void* shift;
  const void* scale;
  int64_t sxb, sxl, sub, sul, syb, syl, srb, srl, sgb, sshb, sscb;
  unsigned rows, L;
  int C, nvec, nv;  // row width, 16-byte vectors per row, vectors per thread
  float eps, inv_c;
  uint32_t f32;  // OperandBit set: that operand is fp32 (else x's dtype)
};

template <class T>
struct Vec {
  static constexpr int N = 16 / Elem<T>::kBytes;  // elements per 16-byte vector
};

// N values of an operand at element offset `off`, fp32 or of type T.
template <class T>
DUO_DEVICE void load_operand(const void* base, bool is_f32, int64_t off, float* out) {
  constexpr int N = Vec<T>::N;
  if (is_f32 || Elem<T>::kBytes == 4) {
    const float* p = static_cast<const float*>(base) + off;
    DUO_UNROLL
    for (int i = 0; i < N; i += 4) unpack16<float>(ldg16(p + i), out + i);
  } else {
    unpack16<T>(ldg16(static_cast<const uint16_t*>(base) + off), out);
  }
}

template <class T>
DUO_DEVICE const T* elem_ptr(const void* base, int64_t off) {
  return static_cast<const T*>(base) + off;
}

// Sum over the TPR threads of a row. TPR <= 32: lanes of one warp. TPR == 0: the whole block (one
// row per block): shuffles, then one partial per warp through shared memory, added in warp order.
template <int TPR>
DUO_DEVICE float row_sum(float v, float* red) {
  if constexpr (TPR > 0) {
    return group_sum<TPR>(v);
  } else {
    v = group_sum<32>(v);
    const int warps = static_cast<int>(blockDim.x) >> 5;
    if (lane_id() == 0) sts<float>(red + warp_id(), v);
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += lds<float>(red + i);
    return s;
  }
}

template <class T, bool RES, bool MOD, int TPR>
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(TPR > 0 ? kRowBlock : 32 * kMaxRowWarps, 1) norm_fwd_kernel(const NormArgs a) {
  constexpr int N = Vec<T>::N;
  const int tid = static_cast<int>(threadIdx.x);
  const int tpr = TPR > 0 ? TPR : static_cast<int>(blockDim.x);
  const int rows_per_block = TPR > 0 ? kRowBlock / TPR : 1;
  const unsigned row = blockIdx.x * rows_per_block + (TPR > 0 ? tid / TPR : 0);
  const int j = TPR > 0 ? tid % TPR : tid;
  // Rows past the end still join the shuffles (full-mask collectives); they only skip memory.
  const bool row_ok = row < a.rows;
  const unsigned b = row_ok ? row / a.L : 0, l = row_ok ? row % a.L : 0;
  float* red = reinterpret_cast<float*>(dynamic_smem());  // TPR == 0: [2][warps]

  const bool has_gate = RES && a.gate != nullptr;
  float v[kMaxVecs][N];
  float sum = 0.f;
  DUO_UNROLL
  for (int i = 0; i < kMaxVecs; ++i) {
    const int vec = j + i * tpr;
    const bool ok = row_ok && i < a.nv && vec < a.nvec;
    const int c = vec * N;
    if (ok) {
      unpack16<T>(ldg16_stream(elem_ptr<T>(a.x, b * a.sxb + l * a.sxl + c)), v[i]);
      if constexpr (RES) {
        float u[N];
        unpack16<T>(ldg16_stream(elem_ptr<T>(a.u, b * a.sub + l * a.sul + c)), u);
        if (has_gate) {
          float g[N];
          load_operand<T>(a.gate, a.f32 & kGateF32, b * a.sgb + c, g);
          DUO_UNROLL
          for (int e = 0; e < N; ++e) v[i][e] = fmaf(g[e], u[e], v[i][e]);
        } else {
          DUO_UNROLL
          for (int e = 0; e < N; ++e) v[i][e] += u[e];
        }
        stg16(static_cast<T*>(a.r) + b * a.srb + l * a.srl + c, pack16<T>(v[i]));
      }
      DUO_UNROLL
      for (int e = 0; e < N; ++e) sum += v[i][e];
    }
  }
  const float mean = row_sum<TPR>(sum, red) * a.inv_c;
  float sq = 0.f;
  DUO_UNROLL
  for (int i = 0; i < kMaxVecs; ++i) {
    const int vec = j + i * tpr;
    if (row_ok && i < a.nv && vec < a.nvec) {
      DUO_UNROLL
      for (int e = 0; e < N; ++e) {
        const float d = v[i][e] - mean;
        sq = fmaf(d, d, sq);
      }
    }
  }
  const float rstd = fast_rsqrt(row_sum<TPR>(sq, red + 32) * a.inv_c + a.eps);

  DUO_UNROLL
  for (int i = 0; i < kMaxVecs; ++i) {
    const int vec = j + i * tpr;
    if (!(row_ok && i < a.nv && vec < a.nvec)) continue;
    const int c = vec * N;
    float y[N];
    DUO_UNROLL
    for (int e = 0; e < N; ++e) y[e] = (v[i][e] - mean) * rstd;
    if (a.w != nullptr) {
      float w[N];
      load_operand<T>(a.w, a.f32 & kWeightF32, c, w);
      DUO_UNROLL
      for (int e = 0; e < N; ++e) y[e] *= w[e];
    }
    if (a.bias != nullptr) {
      float bb[N];
      load_operand<T>(a.bias, a.f32 & kBiasF32, c, bb);
      DUO_UNROLL
      for (int e = 0; e < N; ++e) y[e] += bb[e];
    }
    if constexpr (MOD) {
      float sc[N], sh[N];
      load_operand<T>(a.scale, a.f32 & kScaleF32, b * a.sscb + c, sc);
      load_operand<T>(a.shift, a.f32 & kShiftF32, b * a.sshb + c, sh);
      DUO_UNROLL
      for (int e = 0; e < N; ++e) y[e] = fmaf(y[e], 1.f + sc[e], sh[e]);
    }
    stg16(static_cast<T*>(a.y) + b * a.syb + l * a.syl + c, pack16<T>(y));
  }
}

// Scalar fallback: one row per block of 128 threads, element-wise loads, the fp32 row in shared memory.
template <class T>
DUO_DEVICE float load_elem(const void* base, bool is_f32, int64_t off) {
  return is_f32 ? ldg_elem<float>(static_cast<const float*>(base) + off) : ldg_elem<T>(static_cast<const T*>(base) + off);
}

template <class T>
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(128) norm_fwd_scalar_kernel(const NormArgs a) {
  float* red = reinterpret_cast<float*>(dynamic_smem());  // [2][4] partials, then the row
  float* rowv = red + 8;
  const int tid = static_cast<int>(threadIdx.x);
  const unsigned row = blockIdx.x;
  const unsigned b = row / a.L, l = row % a.L;
  const int C = a.C;
  float sum = 0.f;
  for (int c = tid; c < C; c += 128) {
    float v = ldg_elem<T>(static_cast<const T*>(a.x) + b * a.sxb + l * a.sxl + c);
    if (a.u != nullptr) {
      const float u = ldg_elem<T>(static_cast<const T*>(a.u) + b * a.sub + l * a.sul + c);
      const float g = a.gate != nullptr ? load_elem<T>(a.gate, a.f32 & kGateF32, b * a.sgb + c) : 1.f;
      v = fmaf(g, u, v);
      stg_elem<T>(static_cast<T*>(a.r) + b * a.srb + l * a.srl + c, v);
    }
    sts<float>(rowv + c, v);
    sum += v;
  }
  const float mean = row_sum<0>(sum, red) * a.inv_c;
  float sq = 0.f;
  for (int c = tid; c < C; c += 128) {
    const float d = lds<float>(rowv + c) - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = fast_rsqrt(row_sum<0>(sq, red + 4) * a.inv_c + a.eps);
  for (int c = tid; c < C; c += 128) {
    float y = (lds<float>(rowv + c) - mean) * rstd;
    if (a.w != nullptr) y *= load_elem<T>(a.w, a.f32 & kWeightF32, c);
    if (a.bias != nullptr) y += load_elem<T>(a.bias, a.f32 & kBiasF32, c);
    if (a.shift != nullptr) {
      const float sc = load_elem<T>(a.scale, a.f32 & kScaleF32, b * a.sscb + c);
      const float sh = load_elem<T>(a.shift, a.f32 & kShiftF32, b * a.sshb + c);
      y = fmaf(y, 1.f + sc, sh);
    }
    stg_elem<T>(static_cast<T*>(a.y) + b * a.syb + l * a.syl + c, y);
  }
}

// Launch shape of the vector path for a row of nvec 16-byte vectors: (threads per row or 0 for a
// block per row, warps per row block, vectors per thread).
struct Shape {
  int tpr, warps, nv;
};

Shape vector_shape(int nvec) {
  if (nvec <= 2 * 8) return {8, kRowBlock / 32, (nvec + 7) / 8};
  if (nvec <= 2 * 16) return {16, kRowBlock / 32, (nvec + 15) / 16};
  if (nvec <= kMaxVecs * 32) return {32, kRowBlock / 32, (nvec + 31) / 32};
  int warps = 2;
  while (nvec > kMaxVecs * 32 * warps) warps *= 2;
  return {0, warps, (nvec + 32 * warps - 1) / (32 * warps)};
}

template <class T, bool RES, bool MOD>
const char* launch_vector(const NormArgs& a, cudaStream_t stream) {
  const Shape s = vector_shape(a.nvec);
  if (s.warps > kMaxRowWarps) return "norm: row too wide for the vector path";
  NormArgs args = a;
  args.nv = s.nv;
  if (s.tpr > 0) {
    const int rows_per_block = kRowBlock / s.tpr;
    const unsigned blocks = (a.rows + rows_per_block - 1) / rows_per_block;
    auto kernel = s.tpr == 8 ? norm_fwd_kernel<T, RES, MOD, 8>
                  : s.tpr == 16 ? norm_fwd_kernel<T, RES, MOD, 16> : norm_fwd_kernel<T, RES, MOD, 32>;
    DUO_LAUNCH(kernel, dim3(blocks), dim3(kRowBlock), 0, stream, args);
  } else {
    auto kernel = norm_fwd_kernel<T, RES, MOD, 0>;
    DUO_LAUNCH(kernel, dim3(a.rows), dim3(32 * s.warps), 2 * 32 * sizeof(float), stream, args);
  }
  return last_launch_error();
}

template <class T>
const char* launch_scalar(const NormArgs& a, cudaStream_t stream) {
  auto kernel = norm_fwd_scalar_kernel<T>;
  const int smem = static_cast<int>((8 + a.C) * sizeof(float));
  if (const char* err = allow_smem(kernel, smem)) return err;
  DUO_LAUNCH(kernel, dim3(a.rows), dim3(128), smem, stream, a);
  return last_launch_error();
}

template <class T>
const char* launch_typed(const NormArgs& a, bool vector_ok, cudaStream_t stream) {
  if (!vector_ok) return launch_scalar<T>(a, stream);
  const bool res = a.u != nullptr, mod = a.shift != nullptr;
  if (res && mod) return launch_vector<T, true, true>(a, stream);
  if (res) return launch_vector<T, true, false>(a, stream);
  if (mod) return launch_vector<T, false, true>(a, stream);
  return launch_vector<T, false, false>(a, stream);
}


}  // namespace

const char* norm_fwd(const NormParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.L < 0 || p.C < 1) return "norm: need B >= 0, L >= 0 and C >= 1";
  if (p.C > kNormMaxC) return "norm: C exceeds 32768";
  const int64_t rows = p.B * p.L;
  if (rows == 0) return nullptr;
  if (rows >= (int64_t(1) << 31)) return "norm: B * L exceeds 2^31 - 1 rows";
  if (p.x == nullptr || p.out == nullptr) return "norm: x and out are required";
  if ((p.update == nullptr) != (p.residual_out == nullptr)) return "norm: update and residual_out come together";
  if (p.gate.ptr != nullptr && p.update == nullptr) return "norm: gate needs update";
  if ((p.shift.ptr == nullptr) != (p.scale.ptr == nullptr)) return "norm: shift and scale come together";
  const NormOperand* ops[] = {&p.weight, &p.bias, &p.gate, &p.shift, &p.scale};
  for (const NormOperand* o : ops) {
    if (o->ptr != nullptr && o->dtype != p.dtype && o->dtype != DType::kF32) {
      return "norm: weight, bias, gate, shift and scale must be fp32 or of x's dtype";
    }
  }
  NormArgs a;
  a.x = p.x;
  a.u = p.update;
  a.y = p.out;
  a.r = p.residual_out;
  a.w = p.weight.ptr;
  a.bias = p.bias.ptr;
  a.gate = p.gate.ptr;
  a.shift = p.shift.ptr;
  a.scale = p.scale.ptr;
  a.sxb = p.stride_xb;
  a.sxl = p.stride_xl;
  a.sub = p.stride_ub;
  a.sul = p.stride_ul;
  a.syb = p.stride_ob;
  a.syl = p.stride_ol;
  a.srb = p.stride_rb;
  a.srl = p.stride_rl;
  a.sgb = p.gate.stride_b;
  a.sshb = p.shift.stride_b;
  a.sscb = p.scale.stride_b;
  a.rows = static_cast<unsigned>(rows);
  a.L = static_cast<unsigned>(p.L);
  a.C = static_cast<int>(p.C);
  a.eps = p.eps;
  a.inv_c = 1.0f / static_cast<float>(p.C);
  a.f32 = 0;
  const uint32_t bits[] = {kWeightF32, kBiasF32, kGateF32, kShiftF32, kScaleF32};
  for (int i = 0; i < 5; ++i) {
    if (ops[i]->ptr != nullptr && ops[i]->dtype == DType::kF32) a.f32 |= bits[i];
  }

  // The vector path needs every row start 16-byte aligned: C, the strides and the pointers.
  const int vec = p.dtype == DType::kF32 ? 4 : 8;
  bool ok = p.C % vec == 0;
  const int64_t strides[] = {a.sxb, a.sxl, a.sub, a.sul, a.syb, a.syl, a.srb, a.srl, a.sgb, a.sshb, a.sscb};
  for (int64_t s : strides) ok = ok && s % vec == 0;
  const void* ptrs[] = {a.x, a.u, a.y, a.r, a.w, a.bias, a.gate, a.shift, a.scale};
  for (const void* q : ptrs) ok = ok && (q == nullptr || aligned16(q));
  a.nvec = static_cast<int>(p.C / vec);
  if (ok && vector_shape(a.nvec).warps > kMaxRowWarps) ok = false;  // wider than 16 warps x 4 vectors
  a.nv = 0;

  switch (p.dtype) {
    case DType::kF16: return launch_typed<f16>(a, ok, stream);
    case DType::kBF16: return launch_typed<bf16>(a, ok, stream);
    case DType::kF32: return launch_typed<float>(a, ok, stream);
  }
  return "norm: unknown dtype";
}

}  // namespace duo

// Shared device helpers of the csrc/ kernels: element types, conversions, checked memory access, warp
// reductions and the launch macro. No torch headers (nvcc alone compiles every .cu).
//
// Built two ways:
//   - by nvcc for the GPU (the extension, bench/csrc_report.py): CUDA intrinsics and inline PTX;
//   - by g++ with -DDUODIFF_EMULATE for tests/test_csrc.py: the same kernel source runs on the CPU in the
//     SIMT emulator of csrc/emu/ (every thread a fiber, collectives executed per the PTX ISA).
// Every global / shared memory access of a kernel goes through the helpers below, so the emulator can
// check bounds and alignment; kernels never dereference a global pointer directly.
#pragma once

#include <cstdint>

#include "duodiff.h"

#ifdef DUODIFF_EMULATE
#include <cmath>
#include <cstring>

#include "emu/simt.h"
#define DUO_GLOBAL
#define DUO_DEVICE inline
#define DUO_HOST_DEVICE inline
#define DUO_LAUNCH_BOUNDS(...)
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads()
#define DUO_UNROLL
using dim3 = ::emu::Dim3;
struct uint4 {
  uint32_t x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define DUO_GLOBAL __global__
#define DUO_DEVICE __device__ __forceinline__
#define DUO_HOST_DEVICE __host__ __device__ __forceinline__
#define DUO_LAUNCH_BOUNDS(...) __launch_bounds__(__VA_ARGS__)
#define DUO_UNROLL _Pragma("unroll")
#endif

namespace duo {

// ------------------------------------------------------------------------------------------------
// Element types: 16-bit floats are carried as their bits (uint16_t) in every kernel, so device and
// emulator share one code path; conversions are the only place that differs.
// ------------------------------------------------------------------------------------------------

struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kBytes = 4;
  static constexpr bool kIsBf16 = false;
};
template <>
struct Elem<f16> {
  static constexpr int kBytes = 2;
  static constexpr bool kIsBf16 = false;
};
template <>
struct Elem<bf16> {
  static constexpr int kBytes = 2;
  static constexpr bool kIsBf16 = true;
};

DUO_DEVICE float to_float(float x) { return x; }

DUO_DEVICE float to_float(f16 x) {
#ifdef DUODIFF_EMULATE
  return ::emu::half_bits_to_float(x.bits);
#else
  return __half2float(__ushort_as_half(x.bits));
#endif
}

DUO_DEVICE float to_float(bf16 x) {
  // bf16 is the top half of an fp32: exact and cheap on both sides
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
#ifdef DUODIFF_EMULATE
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

template <class T>
DUO_DEVICE T from_float(float x);

template <>
DUO_DEVICE float from_float<float>(float x) {
  return x;
}

template <>
DUO_DEVICE f16 from_float<f16>(float x) {
#ifdef DUODIFF_EMULATE
  return f16{::emu::float_to_half_bits(x)};
#else
  return f16{__half_as_ushort(__float2half_rn(x))};
#endif
}

template <>
DUO_DEVICE bf16 from_float<bf16>(float x) {
#ifdef DUODIFF_EMULATE
  return bf16{::emu::float_to_bf16_bits(x)};
#else
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#endif
}

// Two floats -> one 32-bit register of two 16-bit values (lo = first), the mma.sync operand format.
template <class T>
DUO_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<T>(lo).bits) | (static_cast<uint32_t>(from_float<T>(hi).bits) << 16);
}

// The i-th 16-bit element of a 16-byte vector, and the j-th 32-bit float of one.
DUO_DEVICE uint16_t vec_u16(const uint4& v, int i) {
  const uint32_t w = i < 2 ? v.x : i < 4 ? v.y : i < 6 ? v.z : v.w;
  return static_cast<uint16_t>((i & 1) ? (w >> 16) : (w & 0xffff));
}

DUO_DEVICE float bits_to_float(uint32_t u) {
#ifdef DUODIFF_EMULATE
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

DUO_DEVICE uint32_t float_to_bits(float f) {
#ifdef DUODIFF_EMULATE
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}

// Unpack a 16-byte vector into VEC floats (VEC = 16 / sizeof(T)) and back.
template <class T>
DUO_DEVICE void unpack16(const uint4& v, float* out) {
  if constexpr (Elem<T>::kBytes == 4) {
    out[0] = bits_to_float(v.x);
    out[1] = bits_to_float(v.y);
    out[2] = bits_to_float(v.z);
    out[3] = bits_to_float(v.w);
  } else {
    DUO_UNROLL
    for (int i = 0; i < 8; ++i) out[i] = to_float(T{vec_u16(v, i)});
  }
}

template <class T>
DUO_DEVICE uint4 pack16(const float* in) {
  uint4 v;
  if constexpr (Elem<T>::kBytes == 4) {
    v.x = float_to_bits(in[0]);
    v.y = float_to_bits(in[1]);
    v.z = float_to_bits(in[2]);
    v.w = float_to_bits(in[3]);
  } else {
    v.x = pack2<T>(in[0], in[1]);
    v.y = pack2<T>(in[2], in[3]);
    v.z = pack2<T>(in[4], in[5]);
    v.w = pack2<T>(in[6], in[7]);
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// Checked memory access. Device: plain loads (ld.global.nc for read-only inputs), 16-byte vectors.
// ------------------------------------------------------------------------------------------------

DUO_DEVICE uint4 ldg16(const void* p) {
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, 16, false, 16);
  uint4 v{};
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldg(static_cast<const uint4*>(p));
#endif
}

// Streaming load: the rows of x / update are read once; do not let them evict the modulation rows.
DUO_DEVICE uint4 ldg16_stream(const void* p) {
#ifdef DUODIFF_EMULATE
  return ldg16(p);
#else
  return __ldcs(static_cast<const uint4*>(p));
#endif
}

// Inline PTX: a uint4 that was just loaded from shared memory is otherwise copied as an aggregate,
// which nvcc 13 lowers to four 4-byte stores (seen in the attention epilogue).
DUO_DEVICE void stg16(void* p, const uint4& v) {
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, 16, true, 16);
  std::memcpy(p, &v, 16);
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

template <class T>
DUO_DEVICE float ldg_elem(const T* p) {
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, sizeof(T), false, sizeof(T));
  T v;
  std::memcpy(&v, p, sizeof(T));
  return to_float(v);
#else
  if constexpr (Elem<T>::kBytes == 4) {
    return __ldg(reinterpret_cast<const float*>(p));
  } else {
    return to_float(T{__ldg(reinterpret_cast<const unsigned short*>(p))});
  }
#endif
}

template <class T>
DUO_DEVICE void stg_elem(T* p, float v) {
  const T t = from_float<T>(v);
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, sizeof(T), true, sizeof(T));
  std::memcpy(p, &t, sizeof(T));
#else
  *p = t;
#endif
}

DUO_DEVICE void stg_f32(float* p, float v) {
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, 4, true, 4);
#endif
  *p = v;
}

DUO_DEVICE float ldg_f32(const float* p) {
#ifdef DUODIFF_EMULATE
  ::emu::check_global(p, 4, false, 4);
  return *p;
#else
  return __ldg(p);
#endif
}

// Shared memory, by byte address within the block's dynamic shared memory.
template <class V>
DUO_DEVICE V lds(const void* p) {
#ifdef DUODIFF_EMULATE
  ::emu::check_shared(p, sizeof(V), sizeof(V) >= 16 ? 16 : sizeof(V));
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#else
  return *static_cast<const V*>(p);
#endif
}

template <class V>
DUO_DEVICE void sts(void* p, const V& v) {
#ifdef DUODIFF_EMULATE
  ::emu::check_shared(p, sizeof(V), sizeof(V) >= 16 ? 16 : sizeof(V));
  std::memcpy(p, &v, sizeof(V));
#else
  *static_cast<V*>(p) = v;
#endif
}

DUO_HOST_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ------------------------------------------------------------------------------------------------
// Warp-level pieces
// ------------------------------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

DUO_DEVICE float shfl_xor(float v, int lane_mask) {
#ifdef DUODIFF_EMULATE
  return ::emu::shfl_xor_f32(kFullMask, v, lane_mask);
#else
  return __shfl_xor_sync(kFullMask, v, lane_mask);
#endif
}

// `v` as seen by lane 0. For a value that is the same in every lane (the warp index) this tells the
// compiler it is warp-uniform, so branches on it need no convergence code around warp collectives.
DUO_DEVICE int warp_broadcast(int v) {
#ifdef DUODIFF_EMULATE
  return static_cast<int>(::emu::shfl_idx_u32(kFullMask, static_cast<uint32_t>(v), 0));
#else
  return __shfl_sync(kFullMask, v, 0);
#endif
}

// Sum over groups of WIDTH consecutive lanes (a butterfly: every lane of the group gets the same,
// bit-identical result, in a fixed order).
template <int WIDTH>
DUO_DEVICE float group_sum(float v) {
  DUO_UNROLL
  for (int m = WIDTH / 2; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

template <int WIDTH>
DUO_DEVICE float group_max(float v) {
  DUO_UNROLL
  for (int m = WIDTH / 2; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

DUO_DEVICE int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
DUO_DEVICE int warp_id() { return static_cast<int>(threadIdx.x) >> 5; }

DUO_DEVICE unsigned char* dynamic_smem() {
#ifdef DUODIFF_EMULATE
  return ::emu::dyn_smem();
#else
  extern __shared__ __align__(16) unsigned char duo_smem[];
  return duo_smem;
#endif
}

// 2^x; ex2.approx.ftz maps -inf to +0, which the online softmax relies on for its first block.
DUO_DEVICE float fast_exp2(float x) {
#ifdef DUODIFF_EMULATE
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

DUO_DEVICE float fast_rsqrt(float x) {
#ifdef DUODIFF_EMULATE
  return 1.0f / std::sqrt(x);
#else
  return rsqrtf(x);
#endif
}

// sigmoid(z) = 1 / (1 + e^-z). __fdividef returns 0 for a denominator beyond 2^126 (z < -87), the
// right limit, and is a MUFU.RCP + FMUL: an IEEE divide or __frcp_rn would call a slow-path
// subroutine whose ABI makes ptxas spill around it.
DUO_DEVICE float sigmoid(float z) {
#ifdef DUODIFF_EMULATE
  return 1.0f / (1.0f + std::exp(-z));
#else
  return __fdividef(1.0f, 1.0f + __expf(-z));
#endif
}

}  // namespace duo

// Launch `kernel` (a function pointer: templates with commas go through a variable first).
#ifdef DUODIFF_EMULATE
#define DUO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch((grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
#else
#define DUO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace duo {

// nullptr when the last launch went out fine, else what went wrong.
inline const char* last_launch_error() {
#ifdef DUODIFF_EMULATE
  return ::emu::error();
#else
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
#endif
}

// Opt in to more than 48 KiB of dynamic shared memory (sm_80: up to 163 KiB, sm_90: 227 KiB).
template <class Kernel>
inline const char* allow_smem(Kernel kernel, int bytes) {
#ifdef DUODIFF_EMULATE
  (void)kernel;
  (void)bytes;
  return nullptr;
#else
  if (bytes <= 48 * 1024) return nullptr;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
#endif
}

}  // namespace duo

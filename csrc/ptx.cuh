// Tensor-core and async-copy primitives as inline PTX (sm_80 and newer), with their emulated twins.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit values, the lower one first:
//   A (16x16, row-major): a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                         a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, "col"):      b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   C/D (16x8, fp32):     c[0], c[1] = C[g][2t, 2t+1]      c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and
// register i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (with .trans: rows
// 2(l%4), 2(l%4)+1 of column l/4, i.e. the matrix transposed).
#pragma once

#include "common.cuh"

namespace duo {

DUO_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#ifdef DUODIFF_EMULATE
  ::emu::ldmatrix(4, false, row_addr, r);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

DUO_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#ifdef DUODIFF_EMULATE
  ::emu::ldmatrix(4, true, row_addr, r);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// d += A * B on the tensor cores, fp32 accumulation. T is f16 or bf16.
template <class T>
DUO_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef DUODIFF_EMULATE
  const uint32_t b[2] = {b0, b1};
  const float c[4] = {d[0], d[1], d[2], d[3]};
  ::emu::mma_m16n8k16(Elem<T>::kIsBf16, a, b, c, d);
#else
  if constexpr (Elem<T>::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg); `valid` false writes 16 zero bytes and
// reads nothing (src-size 0), which is how rows past the end of a sequence are padded.
DUO_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef DUODIFF_EMULATE
  ::emu::cp_async16(smem_dst, gmem_src, valid ? 16 : 0);
#else
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src), "r"(n) : "memory");
#endif
}

DUO_DEVICE void cp_async_commit() {
#ifdef DUODIFF_EMULATE
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
DUO_DEVICE void cp_async_wait() {
#ifdef DUODIFF_EMULATE
  ::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace duo

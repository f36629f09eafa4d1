// C entry points of the emulated kernels, for ctypes (tests/test_csrc.py). Each call registers the
// buffers the kernel may touch ([pointer, pointer + bytes), writable or not), runs the same host
// launcher the extension uses, and returns nullptr or the first failure (launcher or emulator).
#include <cstdint>

#include "../duodiff.h"
#include "simt.h"

namespace {

struct Scope {
  Scope() {
    emu::clear_error();
    emu::clear_buffers();
  }
  ~Scope() { emu::clear_buffers(); }
};

const char* finish(const char* launcher_error) {
  if (launcher_error != nullptr) return launcher_error;
  return emu::error();
}

duo::NormOperand operand(const void* ptr, int dtype, int64_t stride_b) {
  duo::NormOperand o;
  o.ptr = ptr;
  o.dtype = static_cast<duo::DType>(dtype);
  o.stride_b = stride_b;
  return o;
}

}  // namespace

extern "C" {

void duo_emu_configure(int reverse_warp_order, int deferred_cp_async) {
  emu::configure(reverse_warp_order, deferred_cp_async);
}

// A buffer the next call may read (writable = 0) or write; cleared after each call.
static struct Pending {
  const void* p[16];
  int64_t bytes[16];
  int writable[16];
  int n = 0;
} pending;

void duo_emu_buffer(const void* p, int64_t bytes, int writable) {
  if (pending.n < 16) {
    pending.p[pending.n] = p;
    pending.bytes[pending.n] = bytes;
    pending.writable[pending.n] = writable;
    ++pending.n;
  }
}

static void register_pending() {
  for (int i = 0; i < pending.n; ++i) emu::register_buffer(pending.p[i], pending.bytes[i], pending.writable[i]);
  pending.n = 0;
}

const char* duo_emu_attention(const void* qkv, void* out, int dtype, int64_t B, int64_t L, int64_t H, int64_t D,
                              int64_t sqb, int64_t sql, int64_t sq3, int64_t sqh, int64_t sob, int64_t sol,
                              float scale) {
  Scope scope;
  register_pending();
  duo::AttentionParams p;
  p.qkv = qkv;
  p.out = out;
  p.dtype = static_cast<duo::DType>(dtype);
  p.B = B;
  p.L = L;
  p.H = H;
  p.D = D;
  p.stride_qb = sqb;
  p.stride_ql = sql;
  p.stride_q3 = sq3;
  p.stride_qh = sqh;
  p.stride_ob = sob;
  p.stride_ol = sol;
  p.scale = scale;
  return finish(duo::attention_fwd(p, nullptr));
}

// strides: x(b, l), update(b, l), out(b, l), residual(b, l); operands: pointer, dtype, stride_b.
const char* duo_emu_norm(const void* x, const void* update, void* out, void* residual, int dtype, int64_t B,
                         int64_t L, int64_t C, const int64_t* strides, const void* weight, int w_dtype,
                         const void* bias, int b_dtype, const void* gate, int g_dtype, int64_t g_stride,
                         const void* shift, int sh_dtype, int64_t sh_stride, const void* scale, int sc_dtype,
                         int64_t sc_stride, float eps) {
  Scope scope;
  register_pending();
  duo::NormParams p;
  p.x = x;
  p.update = update;
  p.out = out;
  p.residual_out = residual;
  p.dtype = static_cast<duo::DType>(dtype);
  p.B = B;
  p.L = L;
  p.C = C;
  p.stride_xb = strides[0];
  p.stride_xl = strides[1];
  p.stride_ub = strides[2];
  p.stride_ul = strides[3];
  p.stride_ob = strides[4];
  p.stride_ol = strides[5];
  p.stride_rb = strides[6];
  p.stride_rl = strides[7];
  p.weight = operand(weight, w_dtype, 0);
  p.bias = operand(bias, b_dtype, 0);
  p.gate = operand(gate, g_dtype, g_stride);
  p.shift = operand(shift, sh_dtype, sh_stride);
  p.scale = operand(scale, sc_dtype, sc_stride);
  p.eps = eps;
  return finish(duo::norm_fwd(p, nullptr));
}

// The workspace the call needs, in floats (the caller allocates and registers it).
int64_t duo_emu_exit_workspace(int h_dtype, int w_dtype, int64_t B, int64_t L, int64_t C, int64_t K, int64_t start,
                               int64_t shb, int64_t shl, int64_t swc, int64_t swk, const void* h, const void* w) {
  duo::ExitParams p;
  p.h = h;
  p.weight = w;
  p.h_dtype = static_cast<duo::DType>(h_dtype);
  p.w_dtype = static_cast<duo::DType>(w_dtype);
  p.B = B;
  p.L = L;
  p.C = C;
  p.K = K;
  p.start = start;
  p.stride_hb = shb;
  p.stride_hl = shl;
  p.stride_wc = swc;
  p.stride_wk = swk;
  return duo::exit_confidence_workspace(p);
}

int duo_emu_exit_uses_mma(int h_dtype, int w_dtype, int64_t B, int64_t L, int64_t C, int64_t K, int64_t start,
                          int64_t shb, int64_t shl, int64_t swc, int64_t swk, const void* h, const void* w) {
  duo::ExitParams p;
  p.h = h;
  p.weight = w;
  p.h_dtype = static_cast<duo::DType>(h_dtype);
  p.w_dtype = static_cast<duo::DType>(w_dtype);
  p.B = B;
  p.L = L;
  p.C = C;
  p.K = K;
  p.start = start;
  p.stride_hb = shb;
  p.stride_hl = shl;
  p.stride_wc = swc;
  p.stride_wk = swk;
  return duo::exit_confidence_uses_mma(p) ? 1 : 0;
}

const char* duo_emu_exit_confidence(const void* h, int h_dtype, const void* w, int w_dtype, const void* bias,
                                    int bias_dtype, float* out, float* workspace, int64_t B, int64_t L, int64_t C,
                                    int64_t K, int64_t start, int64_t shb, int64_t shl, int64_t swc, int64_t swk,
                                    int64_t sbias, int64_t sout) {
  Scope scope;
  register_pending();
  duo::ExitParams p;
  p.h = h;
  p.h_dtype = static_cast<duo::DType>(h_dtype);
  p.weight = w;
  p.w_dtype = static_cast<duo::DType>(w_dtype);
  p.bias = bias;
  p.bias_dtype = static_cast<duo::DType>(bias_dtype);
  p.out = out;
  p.workspace = workspace;
  p.B = B;
  p.L = L;
  p.C = C;
  p.K = K;
  p.start = start;
  p.stride_hb = shb;
  p.stride_hl = shl;
  p.stride_wc = swc;
  p.stride_wk = swk;
  p.stride_bias = sbias;
  p.stride_out = sout;
  return finish(duo::exit_confidence_fwd(p, nullptr));
}

}  // extern "C"

// The SIMT emulator behind csrc/emu/simt.h (see there for what it checks and why).
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

namespace emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;  // untouched pages cost nothing (mmap)
constexpr int kWarp = 32;

enum State { kReady, kRunning, kAtBarrier, kAtWarpOp, kDone };
enum Op { kNone, kShfl, kShflIdx, kSyncWarp, kLdmatrix, kMma };

struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  Dim3 tid;
  State state = kReady;
  // the pending warp collective: inputs and outputs of this lane
  Op op = kNone;
  unsigned mask = 0;
  int lane_mask = 0, num = 0;
  bool flag = false;
  uint32_t in_u32 = 0;
  const void* ptr = nullptr;
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  uint32_t out_u32[4] = {};
  float out_f32[4] = {};
  // cp.async groups: committed (oldest first) and the open one
  std::deque<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

struct Buffer {
  const char* begin;
  const char* end;
  bool writable;
};

struct Emu {
  Dim3 grid, block, bid;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  bool aborted = false;
  std::string error;
  int reverse = 0, deferred = 1;
  std::vector<Buffer> buffers;
};

Emu g;

void trampoline() {
  (*g.body)();
  g.cur->state = kDone;  // returning resumes the scheduler through uc_link
}

void yield() { swapcontext(&g.cur->ctx, &g.sched); }

int lane_of(const Fiber* f) { return static_cast<int>((f - g.fibers.data()) % kWarp); }

void do_copy(const Copy& c) {
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
}

Fiber& arrive(Op op) {
  Fiber& f = *g.cur;
  f.op = op;
  f.state = kAtWarpOp;
  return f;
}

// ---- the collectives, executed once all 32 lanes of a warp arrived ----

void exec_shfl(Fiber* w) {
  for (int l = 0; l < kWarp; ++l) {
    if (w[l].mask != 0xffffffffu) return fail("shuffle with a partial mask 0x%x", w[l].mask);
    int src = l ^ w[l].lane_mask;
    if (src >= kWarp) src = l;  // PTX: out-of-range source lanes return the caller's own value
    w[l].out_u32[0] = w[src].in_u32;
  }
}

void exec_shfl_idx(Fiber* w) {
  for (int l = 0; l < kWarp; ++l) {
    if (w[l].mask != 0xffffffffu) return fail("shuffle with a partial mask 0x%x", w[l].mask);
    w[l].out_u32[0] = w[w[l].lane_mask & 31].in_u32;
  }
}

void exec_ldmatrix(Fiber* w) {
  const int num = w[0].num;
  const bool trans = w[0].flag;
  uint16_t m[4][8][8];
  for (int l = 0; l < kWarp; ++l) {
    if (w[l].num != num || w[l].flag != trans) return fail("ldmatrix: lanes disagree on .x%d/.trans", num);
  }
  for (int mat = 0; mat < num; ++mat) {
    for (int r = 0; r < 8; ++r) {
      const void* row = w[mat * 8 + r].ptr;
      check_shared(row, 16, 16);
      if (g.aborted) return;
      std::memcpy(m[mat][r], row, 16);
    }
  }
  for (int l = 0; l < kWarp; ++l) {
    for (int mat = 0; mat < num; ++mat) {
      uint16_t lo, hi;
      if (!trans) {
        lo = m[mat][l / 4][2 * (l % 4)];
        hi = m[mat][l / 4][2 * (l % 4) + 1];
      } else {
        lo = m[mat][2 * (l % 4)][l / 4];
        hi = m[mat][2 * (l % 4) + 1][l / 4];
      }
      w[l].out_u32[mat] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

void exec_mma(Fiber* w) {
  const bool bf16 = w[0].flag;
  float A[16][16], B[16][8], C[16][8];
  auto cvt = [bf16](uint32_t bits) { return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits); };
  for (int l = 0; l < kWarp; ++l) {
    if (w[l].flag != bf16) return fail("mma: lanes disagree on the operand type");
    const int gr = l >> 2, t = l & 3;
    const uint32_t* a = w[l].a;
    // A (16x16, row): a0,a1 row g; a2,a3 row g+8; a4..a7 the same rows, columns + 8
    A[gr][2 * t] = cvt(a[0] & 0xffff);          A[gr][2 * t + 1] = cvt(a[0] >> 16);
    A[gr + 8][2 * t] = cvt(a[1] & 0xffff);      A[gr + 8][2 * t + 1] = cvt(a[1] >> 16);
    A[gr][2 * t + 8] = cvt(a[2] & 0xffff);      A[gr][2 * t + 9] = cvt(a[2] >> 16);
    A[gr + 8][2 * t + 8] = cvt(a[3] & 0xffff);  A[gr + 8][2 * t + 9] = cvt(a[3] >> 16);
    // B (16x8, col): b0,b1 rows 2t, 2t+1; b2,b3 rows 2t+8, 2t+9; column g
    B[2 * t][gr] = cvt(w[l].b[0] & 0xffff);     B[2 * t + 1][gr] = cvt(w[l].b[0] >> 16);
    B[2 * t + 8][gr] = cvt(w[l].b[1] & 0xffff); B[2 * t + 9][gr] = cvt(w[l].b[1] >> 16);
    // C/D (16x8): c0,c1 row g, columns 2t, 2t+1; c2,c3 row g+8
    C[gr][2 * t] = w[l].c[0];     C[gr][2 * t + 1] = w[l].c[1];
    C[gr + 8][2 * t] = w[l].c[2]; C[gr + 8][2 * t + 1] = w[l].c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double s = 0.0;  // products of 16-bit floats are exact; one rounding at the end
      for (int k = 0; k < 16; ++k) s += static_cast<double>(A[i][k]) * B[k][j];
      D[i][j] = static_cast<float>(s + C[i][j]);
    }
  }
  for (int l = 0; l < kWarp; ++l) {
    const int gr = l >> 2, t = l & 3;
    w[l].out_f32[0] = D[gr][2 * t];
    w[l].out_f32[1] = D[gr][2 * t + 1];
    w[l].out_f32[2] = D[gr + 8][2 * t];
    w[l].out_f32[3] = D[gr + 8][2 * t + 1];
  }
}

// Run warp `w` until all its lanes wait at a block barrier or exited.
void run_warp(int w) {
  Fiber* lanes = &g.fibers[static_cast<size_t>(w) * kWarp];
  for (;;) {
    for (int l = 0; l < kWarp; ++l) {
      Fiber& f = lanes[l];
      if (f.state != kReady) continue;
      f.state = kRunning;
      g.cur = &f;
      swapcontext(&g.sched, &f.ctx);
      g.cur = nullptr;
      if (g.aborted) return;
    }
    int at_op = 0, done = 0;
    for (int l = 0; l < kWarp; ++l) {
      at_op += lanes[l].state == kAtWarpOp;
      done += lanes[l].state == kDone;
    }
    if (at_op == 0) return;
    if (at_op != kWarp) {
      return fail("divergent warp collective in warp %d: %d lanes at a warp operation, %d exited, %d at "
                  "__syncthreads", w, at_op, done, kWarp - at_op - done);
    }
    const Op op = lanes[0].op;
    for (int l = 0; l < kWarp; ++l) {
      if (lanes[l].op != op) return fail("warp %d: lanes at different warp operations", w);
    }
    if (op == kShfl) exec_shfl(lanes);
    else if (op == kShflIdx) exec_shfl_idx(lanes);
    else if (op == kLdmatrix) exec_ldmatrix(lanes);
    else if (op == kMma) exec_mma(lanes);
    if (g.aborted) return;
    for (int l = 0; l < kWarp; ++l) {
      lanes[l].state = kReady;
      lanes[l].op = kNone;
    }
  }
}

void run_block(size_t smem_bytes) {
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  g.smem.assign(smem_bytes, 0xff);
  for (int t = 0; t < n; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = Dim3(t % g.block.x, (t / g.block.x) % g.block.y, t / (g.block.x * g.block.y));
    f.state = kReady;
    f.op = kNone;
    f.groups.clear();
    f.open.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  const int warps = n / kWarp;
  for (;;) {
    for (int i = 0; i < warps; ++i) {
      run_warp(g.reverse ? warps - 1 - i : i);
      if (g.aborted) return;
    }
    int done = 0, at_bar = 0;
    for (int t = 0; t < n; ++t) {
      done += g.fibers[t].state == kDone;
      at_bar += g.fibers[t].state == kAtBarrier;
    }
    if (done == n) return;
    if (at_bar != n) {
      return fail("__syncthreads reached by %d of %d threads of block (%u,%u,%u); %d exited", at_bar, n,
                  g.bid.x, g.bid.y, g.bid.z, done);
    }
    for (int t = 0; t < n; ++t) g.fibers[t].state = kReady;
  }
}

}  // namespace

// ---- device-side API ----

const Dim3& thread_idx() { return g.cur->tid; }
const Dim3& block_idx() { return g.bid; }
const Dim3& block_dim() { return g.block; }
const Dim3& grid_dim() { return g.grid; }
unsigned char* dyn_smem() { return g.smem.data(); }

void syncthreads() {
  g.cur->state = kAtBarrier;
  yield();
}

void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask 0x%x", mask);
  arrive(kSyncWarp);
  yield();
}

uint32_t shfl_xor_u32(unsigned mask, uint32_t v, int lane_mask) {
  Fiber& f = arrive(kShfl);
  f.mask = mask;
  f.in_u32 = v;
  f.lane_mask = lane_mask;
  yield();
  return f.out_u32[0];
}

uint32_t shfl_idx_u32(unsigned mask, uint32_t v, int src_lane) {
  Fiber& f = arrive(kShflIdx);
  f.mask = mask;
  f.in_u32 = v;
  f.lane_mask = src_lane;
  yield();
  return f.out_u32[0];
}

float shfl_xor_f32(unsigned mask, float v, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = shfl_xor_u32(mask, bits, lane_mask);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

void ldmatrix(int num, bool trans, const void* row, uint32_t* out) {
  Fiber& f = arrive(kLdmatrix);
  f.num = num;
  f.flag = trans;
  f.ptr = row;
  yield();
  for (int i = 0; i < num; ++i) out[i] = f.out_u32[i];
}

void mma_m16n8k16(bool bf16, const uint32_t a[4], const uint32_t b[2], const float c[4], float d[4]) {
  Fiber& f = arrive(kMma);
  f.flag = bf16;
  std::memcpy(f.a, a, sizeof f.a);
  std::memcpy(f.b, b, sizeof f.b);
  std::memcpy(f.c, c, sizeof f.c);
  yield();
  std::memcpy(d, f.out_f32, sizeof f.out_f32);
}

void cp_async16(void* dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) return fail("cp.async with %d source bytes", src_bytes);
  check_shared(dst, 16, 16);
  if (src_bytes) check_global(src, 16, false, 16);
  Copy c{dst, src, src_bytes};
  if (g.deferred) {
    std::memset(dst, 0xff, 16);  // what a reader that did not wait would see: NaN
    g.cur->open.push_back(c);
  } else {
    do_copy(c);
  }
}

void cp_async_commit() {
  Fiber& f = *g.cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = *g.cur;
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) do_copy(c);
    f.groups.pop_front();
  }
}

void check_global(const void* p, size_t bytes, bool write, size_t align) {
  if (g.aborted) return;
  const char* b = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % align) {
    return fail("global %s of %zu bytes at %p is not %zu-byte aligned", write ? "store" : "load", bytes, p,
                align);
  }
  bool inside = false;
  for (const Buffer& buf : g.buffers) {
    if (b >= buf.begin && b + bytes <= buf.end) {
      if (!write || buf.writable) return;  // (an in-place output is registered twice: input and output)
      inside = true;
    }
  }
  if (inside) return fail("global store into a read-only buffer at %p", p);
  fail("global %s of %zu bytes at %p is outside every buffer", write ? "store" : "load", bytes, p);
}

void check_shared(const void* p, size_t bytes, size_t align) {
  if (g.aborted) return;
  const unsigned char* b = static_cast<const unsigned char*>(p);
  if (static_cast<size_t>(b - g.smem.data()) % align) {
    return fail("shared access of %zu bytes at offset %td is not %zu-byte aligned", bytes, b - g.smem.data(),
                align);
  }
  if (b < g.smem.data() || b + bytes > g.smem.data() + g.smem.size()) {
    fail("shared access of %zu bytes at offset %td is outside the %zu bytes of dynamic shared memory", bytes,
         b - g.smem.data(), g.smem.size());
  }
}

// ---- host side ----

void fail(const char* fmt, ...) {
  if (!g.aborted) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g.error = buf;
    if (g.cur != nullptr) {
      char where[128];
      std::snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", g.bid.x, g.bid.y, g.bid.z,
                    g.cur->tid.x, g.cur->tid.y, g.cur->tid.z);
      g.error += where;
    }
    g.aborted = true;
  }
  if (g.cur != nullptr) {  // inside a kernel: never resume this fiber
    g.cur->state = kDone;
    yield();
  }
}

void launch(Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g.aborted) return;
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  if (n == 0 || n > 1024 || n % kWarp) return fail("block of %zu threads (need a multiple of 32, <= 1024)", n);
  if (grid.y > 65535 || grid.z > 65535) return fail("grid (%u, %u, %u) exceeds 65535 in y or z", grid.x, grid.y,
                                                    grid.z);
  if (smem_bytes > 227 * 1024) return fail("%zu bytes of shared memory exceed the 227 KiB of sm_90", smem_bytes);
  while (g.fibers.size() < n) {
    g.fibers.emplace_back();
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED) return fail("mmap of a fiber stack failed");
    g.fibers.back().stack = stack;
  }
  g.grid = grid;
  g.block = block;
  g.body = &body;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g.bid = Dim3(x, y, z);
        run_block(smem_bytes);
        if (g.aborted) return;
      }
    }
  }
}

void register_buffer(const void* p, size_t bytes, bool writable) {
  const char* b = static_cast<const char*>(p);
  g.buffers.push_back({b, b + bytes, writable});
}

void clear_buffers() { g.buffers.clear(); }
void configure(int reverse_warp_order, int deferred_cp_async) {
  g.reverse = reverse_warp_order;
  g.deferred = deferred_cp_async;
}
const char* error() { return g.aborted ? g.error.c_str() : nullptr; }
void clear_error() {
  g.aborted = false;
  g.error.clear();
}

// ---- conversions ----

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  if (std::isnan(f)) return sign | 0x7e00;
  const float a = std::fabs(f);
  if (a >= 65520.0f) return sign | 0x7c00;  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {          // subnormal: multiples of 2^-24, round half to even
    const float q = a * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(q));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float mant = std::nearbyint(m * 2048.0f);  // 11 significant bits
  if (mant == 2048.0f) {
    mant = 1024.0f;
    e += 1;
  }
  const int exp = e - 1 + 15;
  return sign | static_cast<uint16_t>((exp << 10) | (static_cast<uint32_t>(mant) - 1024));
}

float bf16_bits_to_float(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace emu

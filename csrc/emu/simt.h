// A small SIMT emulator: runs the kernels of csrc/ on the CPU, lane by lane, to test them without a GPU.
//
// Not part of the extension. Built only by tests/test_csrc.py (g++ -DDUODIFF_EMULATE), which loads the
// result with ctypes and compares against the float64 references of duodiff_fast.ops.
//
// Every thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches a
// collective operation; the collective executes once all the lanes it involves have arrived:
//   - warp collectives (shuffles, ldmatrix, mma.sync, __syncwarp) need all 32 lanes of the warp at the
//     same kind of operation, else the launch fails ("divergent warp collective");
//   - __syncthreads needs every thread of the block; a thread that exited while others wait fails it.
// Warps run one after the other until they block at a barrier, in forward or reverse order
// (`configure`), so a missing __syncthreads shows up as a wrong result in one of the two orders.
// cp.async is emulated adversarially in `deferred` mode: the destination is poisoned (0xFF bytes, NaN
// in every float type) at issue and filled at the matching wait_group, so reading a stage before its
// wait, or refilling a stage other warps still read, corrupts the result. `eager` mode copies at issue.
// Every global and shared access goes through checked helpers: an access outside the registered
// buffers / the block's shared memory, or a misaligned vector access, fails the launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3() = default;
  Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
unsigned char* dyn_smem();  // the block's dynamic shared memory (poisoned with 0xFF at block start)

void syncthreads();
void syncwarp(unsigned mask);
uint32_t shfl_xor_u32(unsigned mask, uint32_t v, int lane_mask);
uint32_t shfl_idx_u32(unsigned mask, uint32_t v, int src_lane);
float shfl_xor_f32(unsigned mask, float v, int lane_mask);
// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16: `row` is this lane's row address (lanes
// 0 .. 8*num-1 supply one each); `out` receives `num` 32-bit registers.
void ldmatrix(int num, bool trans, const void* row, uint32_t* out);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, fragments per the PTX ISA.
void mma_m16n8k16(bool bf16, const uint32_t a[4], const uint32_t b[2], const float c[4], float d[4]);

void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes);  // src_bytes 0 or 16 (zero fill)
void cp_async_commit();
void cp_async_wait(int pending);

void check_global(const void* p, size_t bytes, bool write, size_t align);
void check_shared(const void* p, size_t bytes, size_t align);

// ---- host side ----
void launch(Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body);
void register_buffer(const void* p, size_t bytes, bool writable);
void clear_buffers();
void configure(int reverse_warp_order, int deferred_cp_async);
const char* error();  // first failure of the last launch, or nullptr
void clear_error();
void fail(const char* fmt, ...);

// Software float conversions (the emulator has no CUDA headers).
float half_bits_to_float(uint16_t h);
uint16_t float_to_half_bits(float f);
float bf16_bits_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float f);

}  // namespace emu

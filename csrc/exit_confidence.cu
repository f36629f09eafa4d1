// Early-exit confidence: out[b] = mean over tokens l >= start and outputs k < K of
// sigmoid(h[b, l] . w[:, k] + bias[k]).
//
// One read of h on the tensor-core path for up to 128 outputs (wider maps: one pass per 128); the
// CUDA-core path reads h once per 4 outputs (K = 1, the DuoDiff probe: once). Deterministic without float
// atomics: stage 1 writes one fp32 partial per (sample, pass, block of tokens), stage 2 adds a
// sample's partials in a fixed order. Block sizes depend on (C, K) only, never on B, so a sample's
// result is bit-identical whatever batch it is computed in.
//
// Stage 1 has two kernels:
//   - tensor cores (K > 1, h and w both fp16 or both bf16, 16-byte aligned rows): 64 tokens per CTA,
//     one 16-token tile per warp; h and w^T chunks of 64 channels stream through a two-stage cp.async
//     pipeline; z = h w on mma.sync (w^T rows are B fragments as stored, like K in attention). The
//     products of 16-bit values are exact in fp32, so this matches an fp32 reference up to summation
//     order;
//   - CUDA cores (everything else: fp32 h or w (no tf32 rounding of an fp32 weight), mixed dtypes,
//     K == 1, unaligned rows): 32 tokens per CTA, a warp per token, the weight columns of the pass
//     staged in shared memory as fp32, 16-byte loads of h where aligned.
#include "common.cuh"
#include "ptx.cuh"

namespace duo {
namespace {

// ---- tensor-core path ----
constexpr int kMmaTokens = 64;    // tokens per CTA: 4 warps x 16
constexpr int kMmaChunk = 64;     // channels per pipeline stage
constexpr int kMmaStride = 72;    // shared row stride (elements): 16-byte pad, conflict-free ldmatrix
// ---- CUDA-core path ----
constexpr int kSimtTokens = 32;   // tokens per CTA: 4 warps x 8
constexpr int kSimtMaxSmem = 96 * 1024;

struct ExitArgs {
  const void* h;
  const void* w;
  const void* bias;
  float* partial;  // [B][passes][n_blocks]
  int64_t shb, shl, swc, swk, sbias;
  int L, C, K, start, n_blocks, passes;
  int w_dtype, bias_dtype;  // DType of w (CUDA-core path) and bias
};

DUO_DEVICE float load_any(const void* base, int dtype, int64_t off) {
  if (dtype == static_cast<int>(DType::kF32)) return ldg_elem<float>(static_cast<const float*>(base) + off);
  if (dtype == static_cast<int>(DType::kBF16)) return ldg_elem<bf16>(static_cast<const bf16*>(base) + off);
  return ldg_elem<f16>(static_cast<const f16*>(base) + off);
}

// Block-wide sum of one value per thread, in a fixed order (shuffles, then warps 0, 1, 2, 3).
DUO_DEVICE float block_sum4(float v, float* red) {
  v = group_sum<32>(v);
  if (lane_id() == 0) sts<float>(red + warp_id(), v);
  __syncthreads();
  return (lds<float>(red) + lds<float>(red + 1)) + (lds<float>(red + 2) + lds<float>(red + 3));
}

template <class T, int NT>
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(128) exit_mma_kernel(const ExitArgs a) {
  constexpr int KT = 8 * NT;  // outputs per pass
  constexpr int S = kMmaStride;
  constexpr int kStageRows = kMmaTokens + KT;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = warp_broadcast(tid >> 5);
  const int blk = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_blocks));
  const unsigned rest = blockIdx.x / static_cast<unsigned>(a.n_blocks);
  const int pass = static_cast<int>(rest % static_cast<unsigned>(a.passes));
  const int64_t b = rest / static_cast<unsigned>(a.passes);
  const int tok0 = a.start + blk * kMmaTokens;
  const int k0 = pass * KT;

  uint16_t* sm = reinterpret_cast<uint16_t*>(dynamic_smem());  // [2 stages][64 tokens + KT outputs][S]
  float* red = reinterpret_cast<float*>(sm + 2 * kStageRows * S);
  const uint16_t* h = static_cast<const uint16_t*>(a.h) + b * a.shb;
  const uint16_t* w = static_cast<const uint16_t*>(a.w);

  auto load_chunk = [&](int c0, int stage) {
    uint16_t* dst = sm + stage * kStageRows * S;
    for (int i = tid; i < kStageRows * (kMmaChunk / 8); i += 128) {
      const int r = i >> 3, cc = (i & 7) * 8;
      const int c = c0 + cc;
      if (r < kMmaTokens) {
        const int tok = tok0 + r;
        const bool ok = tok < a.L && c < a.C;
        cp_async16(dst + r * S + cc, h + (ok ? static_cast<int64_t>(tok) * a.shl + c : 0), ok);
      } else {
        const int k = k0 + r - kMmaTokens;
        const bool ok = k < a.K && c < a.C;
        cp_async16(dst + r * S + cc, w + (ok ? static_cast<int64_t>(k) * a.swk + c : 0), ok);
      }
    }
  };

  float acc[NT][4];
  DUO_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    DUO_UNROLL
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  }
  const bool active = tok0 + warp * 16 < a.L;  // warp-uniform
  const int a_lane = (warp * 16 + (lane & 15)) * S + (lane >> 4) * 8;
  const int b_lane = (kMmaTokens + ((lane >> 4) << 3) + (lane & 7)) * S + ((lane >> 3) & 1) * 8;

  const int n_chunks = (a.C + kMmaChunk - 1) / kMmaChunk;
  load_chunk(0, 0);
  cp_async_commit();
  for (int ch = 0; ch < n_chunks; ++ch) {
    if (ch + 1 < n_chunks) {
      load_chunk((ch + 1) * kMmaChunk, (ch + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* st = sm + (ch & 1) * kStageRows * S;
    if (active) {
      DUO_UNROLL
      for (int ks = 0; ks < kMmaChunk / 16; ++ks) {
        uint32_t af[4];
        ldmatrix_x4(af, st + a_lane + ks * 16);
        DUO_UNROLL
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, st + b_lane + np * 16 * S + ks * 16);
          mma_m16n8k16<T>(acc[2 * np], af, bf[0], bf[1]);
          mma_m16n8k16<T>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // stage ch & 1 is refilled by the next iteration's copies
  }

  // Accumulator (nt, e) is token warp*16 + lane/4 + 8*(e/2), output k0 + nt*8 + 2*(lane%4) + (e%2).
  float sum = 0.f;
  const int tok_a = tok0 + warp * 16 + (lane >> 2);
  DUO_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    DUO_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int tok = tok_a + 8 * (e >> 1);
      const int k = k0 + nt * 8 + 2 * (lane & 3) + (e & 1);
      if (tok < a.L && k < a.K) sum += sigmoid(acc[nt][e] + load_any(a.bias, a.bias_dtype, k * a.sbias));
    }
  }
  const float total = block_sum4(sum, red);
  if (tid == 0) stg_f32(a.partial + (b * a.passes + pass) * a.n_blocks + blk, total);
}

template <class TH, int KF, bool HVEC>
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(128) exit_simt_kernel(const ExitArgs a) {
  constexpr int N = HVEC ? 16 / Elem<TH>::kBytes : 1;  // h elements per load
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = warp_broadcast(tid >> 5);  // warp-uniform token loop: no convergence code
  const int blk = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_blocks));
  const unsigned rest = blockIdx.x / static_cast<unsigned>(a.n_blocks);
  const int pass = static_cast<int>(rest % static_cast<unsigned>(a.passes));
  const int64_t b = rest / static_cast<unsigned>(a.passes);
  const int tok0 = a.start + blk * kSimtTokens;
  const int k0 = pass * KF;
  const int C = a.C;

  float* red = reinterpret_cast<float*>(dynamic_smem());  // [4] partials, then w: [KF][C] fp32
  float* ws = red + 4;
  for (int i = tid; i < KF * C; i += 128) {
    const int k = k0 + i / C, c = i % C;
    sts<float>(ws + i, k < a.K ? load_any(a.w, a.w_dtype, c * a.swc + k * a.swk) : 0.f);
  }
  __syncthreads();

  float bias[KF];
  DUO_UNROLL
  for (int k = 0; k < KF; ++k) bias[k] = k0 + k < a.K ? load_any(a.bias, a.bias_dtype, (k0 + k) * a.sbias) : 0.f;

  float sum = 0.f;  // meaningful in lane 0: sigmoids of this warp's tokens, in token order
  for (int t = warp; t < kSimtTokens; t += 4) {
    const int tok = tok0 + t;
    if (tok >= a.L) break;  // warp-uniform
    const TH* row = static_cast<const TH*>(a.h) + b * a.shb + static_cast<int64_t>(tok) * a.shl;
    float z[KF];
    DUO_UNROLL
    for (int k = 0; k < KF; ++k) z[k] = 0.f;
    for (int c = lane * N; c < C; c += 32 * N) {
      float hv[N];
      if constexpr (HVEC) {
        unpack16<TH>(ldg16_stream(row + c), hv);
      } else {
        hv[0] = ldg_elem<TH>(row + c);
      }
      DUO_UNROLL
      for (int k = 0; k < KF; ++k) {
        DUO_UNROLL
        for (int e = 0; e < N; ++e) z[k] = fmaf(hv[e], lds<float>(ws + k * C + c + e), z[k]);
      }
    }
    float s = 0.f;
    DUO_UNROLL
    for (int k = 0; k < KF; ++k) {
      const float zk = group_sum<32>(z[k]);
      if (k0 + k < a.K) s += sigmoid(zk + bias[k]);
    }
    sum += s;
  }
  const float total = block_sum4(lane == 0 ? sum : 0.f, red);
  if (tid == 0) stg_f32(a.partial + (b * a.passes + pass) * a.n_blocks + blk, total);
}

// out[b] = (sum of its partials, in order) / count. One warp per sample.
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(32) exit_reduce_kernel(const float* partial, float* out, int per_sample,
                                                         float count, int64_t stride_out) {
  const int64_t b = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  float s = 0.f;
  for (int i = lane; i < per_sample; i += 32) s += ldg_f32(partial + b * per_sample + i);
  s = group_sum<32>(s);
  if (lane == 0) stg_f32(out + b * stride_out, s / count);
}

enum class Path { kMma, kSimt };

struct Plan {
  Path path;
  int nt;      // mma: n-tiles per pass (2, 4, 8, 16)
  int kf;      // simt: outputs per pass (1 or 4)
  bool hvec;   // simt: 16-byte loads of h
  int passes, n_blocks, smem;
};

int elem_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

bool mma_ok(const ExitParams& p) {
  return p.K > 1 && p.h_dtype != DType::kF32 && p.w_dtype == p.h_dtype && p.C % 8 == 0 && p.stride_hb % 8 == 0 &&
         p.stride_hl % 8 == 0 && aligned16(p.h);
}

bool mma_weight_ok(const ExitParams& p) { return p.stride_wc == 1 && p.stride_wk % 8 == 0 && aligned16(p.weight); }

Plan make_plan(const ExitParams& p) {
  Plan pl{};
  const int64_t n_tok = p.L - p.start;
  if (mma_ok(p) && mma_weight_ok(p)) {
    pl.path = Path::kMma;
    pl.nt = p.K <= 16 ? 2 : p.K <= 32 ? 4 : p.K <= 64 ? 8 : 16;
    pl.passes = static_cast<int>((p.K + 8 * pl.nt - 1) / (8 * pl.nt));
    pl.n_blocks = static_cast<int>((n_tok + kMmaTokens - 1) / kMmaTokens);
    pl.smem = 2 * (kMmaTokens + 8 * pl.nt) * kMmaStride * 2 + 4 * static_cast<int>(sizeof(float));
  } else {
    pl.path = Path::kSimt;
    const int eb = elem_bytes(p.h_dtype), n = 16 / eb;
    pl.hvec = p.C % n == 0 && p.stride_hb % n == 0 && p.stride_hl % n == 0 && aligned16(p.h);
    pl.kf = p.K >= 4 && 4 * p.C * 4 <= kSimtMaxSmem ? 4 : 1;
    pl.passes = static_cast<int>((p.K + pl.kf - 1) / pl.kf);
    pl.n_blocks = static_cast<int>((n_tok + kSimtTokens - 1) / kSimtTokens);
    pl.smem = static_cast<int>((4 + pl.kf * p.C) * sizeof(float));
  }
  return pl;
}

template <class T>
const char* launch_mma(const ExitArgs& a, const Plan& pl, int64_t blocks, cudaStream_t stream) {
  auto kernel = pl.nt == 2 ? exit_mma_kernel<T, 2>
                : pl.nt == 4 ? exit_mma_kernel<T, 4> : pl.nt == 8 ? exit_mma_kernel<T, 8> : exit_mma_kernel<T, 16>;
  if (const char* err = allow_smem(kernel, pl.smem)) return err;
  DUO_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(128), pl.smem, stream, a);
  return last_launch_error();
}

template <class TH>
const char* launch_simt(const ExitArgs& a, const Plan& pl, int64_t blocks, cudaStream_t stream) {
  auto kernel = pl.kf == 4 ? (pl.hvec ? exit_simt_kernel<TH, 4, true> : exit_simt_kernel<TH, 4, false>)
                           : (pl.hvec ? exit_simt_kernel<TH, 1, true> : exit_simt_kernel<TH, 1, false>);
  if (const char* err = allow_smem(kernel, pl.smem)) return err;
  DUO_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(128), pl.smem, stream, a);
  return last_launch_error();
}

}  // namespace

bool exit_confidence_uses_mma(const ExitParams& p) { return mma_ok(p); }
bool exit_confidence_weight_ok_for_mma(const ExitParams& p) { return mma_weight_ok(p); }

int64_t exit_confidence_workspace(const ExitParams& p) {
  if (p.B <= 0 || p.L <= p.start || p.K <= 0) return 0;
  const Plan pl = make_plan(p);
  return p.B * pl.passes * pl.n_blocks;
}

const char* exit_confidence_fwd(const ExitParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.C < 1 || p.K < 1) return "exit_confidence: need B >= 0, C >= 1 and K >= 1";
  if (p.start < 0 || p.start >= p.L) return "exit_confidence: need 0 <= start < L";
  if (p.L >= (int64_t(1) << 31) || p.C >= (int64_t(1) << 31) || p.K >= (int64_t(1) << 24)) {
    return "exit_confidence: L, C or K too large";
  }
  if (p.B == 0) return nullptr;
  const Plan pl = make_plan(p);
  if (pl.path == Path::kSimt && pl.smem > 160 * 1024) return "exit_confidence: C too large for the CUDA-core path";
  const int64_t per_sample = static_cast<int64_t>(pl.passes) * pl.n_blocks;
  const int64_t blocks = p.B * per_sample;
  if (blocks > 0x7fffffff || per_sample > 0x7fffffff) return "exit_confidence: too many blocks for one grid";
  if (p.workspace == nullptr || p.out == nullptr) return "exit_confidence: out and workspace are required";
  ExitArgs a;
  a.h = p.h;
  a.w = p.weight;
  a.bias = p.bias;
  a.partial = p.workspace;
  a.shb = p.stride_hb;
  a.shl = p.stride_hl;
  a.swc = p.stride_wc;
  a.swk = p.stride_wk;
  a.sbias = p.stride_bias;
  a.L = static_cast<int>(p.L);
  a.C = static_cast<int>(p.C);
  a.K = static_cast<int>(p.K);
  a.start = static_cast<int>(p.start);
  a.n_blocks = pl.n_blocks;
  a.passes = pl.passes;
  a.w_dtype = static_cast<int>(p.w_dtype);
  a.bias_dtype = static_cast<int>(p.bias_dtype);
  const char* err = nullptr;
  if (pl.path == Path::kMma) {
    err = p.h_dtype == DType::kBF16 ? launch_mma<bf16>(a, pl, blocks, stream) : launch_mma<f16>(a, pl, blocks, stream);
  } else if (p.h_dtype == DType::kF32) {
    err = launch_simt<float>(a, pl, blocks, stream);
  } else if (p.h_dtype == DType::kBF16) {
    err = launch_simt<bf16>(a, pl, blocks, stream);
  } else {
    err = launch_simt<f16>(a, pl, blocks, stream);
  }
  if (err != nullptr) return err;
  const float count = static_cast<float>(static_cast<double>(p.L - p.start) * static_cast<double>(p.K));
  auto reduce = exit_reduce_kernel;
  DUO_LAUNCH(reduce, dim3(static_cast<unsigned>(p.B)), dim3(32), 0, stream, p.workspace, p.out,
             static_cast<int>(per_sample), count, p.stride_out);
  return last_launch_error();
}

}  // namespace duo

// Fused multi-head attention forward on the packed qkv of a Linear: [B, L, 3, H, D] -> [B, L, H*D].
//
// FlashAttention-2 structure on mma.sync (HMMA; the same code runs on sm_80 and sm_90a):
//   - one CTA of 4 warps per (query tile, batch, head); each warp owns MT tiles of 16 query rows,
//     interleaved across warps (warp w, tile i: rows (i*4 + w)*16 ..), so a short tail tile keeps
//     all warps busy before any warp gets a second tile;
//   - Q is loaded once (cp.async) and kept in registers as mma A fragments; K and V blocks of 64 keys
//     stream through a two-stage cp.async pipeline in shared memory, rows padded by 16 bytes so that
//     ldmatrix (8 rows x 16 bytes per phase) hits 8 different bank groups;
//   - S = Q K^T on the tensor cores (K rows are B fragments as stored: ldmatrix without .trans), online
//     softmax in fp32 registers in the log2 domain with the scale folded in (exp2(s * scale * log2 e - m)),
//     P re-packed from the S accumulators straight into A fragments (the C layout of two n-tiles is the
//     A layout of one k-step), O += P V with V as B fragments through ldmatrix.trans;
//   - the row max is reduced across the 4 lanes holding a row (two shuffles); the row sum stays a
//     per-lane partial until the end (alpha is uniform across those lanes);
//   - O is normalised once, staged through shared memory and written with 16-byte stores.
// Tiles, like the Triton kernel: keys run over L / 64 full blocks without any mask, then one masked
// block holding the L % 64 remainder, in which only the 16-key groups that hold valid keys are
// computed (L = 257 pays one 16-key group beyond 256). Queries: full 16*4*MT-row tiles; the last tile
// masks its loads / stores, and warps whose rows all lie past L skip the math.
// Head dims that are not a multiple of 16 (72) are zero-padded to one in shared memory (80).
#include "common.cuh"
#include "ptx.cuh"

namespace duo {
namespace {

constexpr int kWarps = 4;
constexpr int kBlockN = 64;

struct AttnArgs {
  const uint16_t* qkv;
  uint16_t* out;
  int64_t sqb, sql, sq3, sqh, sob, sol;
  int L, H, n_mtiles;
  float qk_scale;  // scale * log2(e)
};

template <int D, int DP, int MT>
struct AttnTile {
  static_assert(D % 8 == 0 && DP % 16 == 0 && DP >= D && DP - D < 16, "head dim padding");
  static constexpr int kBM = 16 * MT * kWarps;  // query rows per CTA
  static constexpr int kStride = DP + 8;        // shared row stride (elements): 16-byte pad
  static constexpr int kChunks = D / 8;         // 16-byte chunks per row in global memory
  static constexpr int kKSteps = DP / 16;       // k-steps of S = Q K^T
  static constexpr int kNT = kBlockN / 8;       // n-tiles of S
  static constexpr int kDT = DP / 8;            // n-tiles of O
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kBM + 4 * kBlockN;  // Q, then K and V in two stages each
  static constexpr int kSmemBytes = kRows * kStride * 2;
};

// One warp's share of a query tile: Q fragments, O accumulators and softmax statistics, in registers.
template <class T, int D, int DP, int MT>
struct WarpTile {
  using Tile = AttnTile<D, DP, MT>;
  static constexpr int S = Tile::kStride;
  uint32_t qf[MT][Tile::kKSteps][4];
  float acc[MT][Tile::kDT][4];
  float m_run[MT][2], l_run[MT][2];
  bool active[MT];  // warp-uniform: the 16-row tile holds at least one query row

  template <bool ALL>
  DUO_DEVICE bool on(int mt) const { return ALL || active[mt]; }

  // One block of 64 keys; MASKED: only the first n_valid (< 64) exist. ALL: every tile of this warp is
  // active (no per-tile branches between the mma.sync, so the compiler can interleave them with the
  // ldmatrix of the next fragments). k_lane / v_lane: this lane's ldmatrix row offsets (elements).
  template <bool MASKED, bool ALL>
  DUO_DEVICE void step(const uint16_t* kS, const uint16_t* vS, int n_valid, int k_lane, int v_lane, int lane,
                       float qk_scale) {
    float s[MT][Tile::kNT][4];
    DUO_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      DUO_UNROLL
      for (int nt = 0; nt < Tile::kNT; ++nt) {
        DUO_UNROLL
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
      }
    }
    // S = Q K^T. One ldmatrix.x4 gives the B fragments of two n-tiles (16 keys) for one k-step:
    // lanes 0-7 / 8-15 / 16-23 / 24-31 address (keys 0-7, dims 0-7) / (keys 0-7, dims 8-15) /
    // (keys 8-15, dims 0-7) / (keys 8-15, dims 8-15): registers {0, 1} are b0, b1 of n-tile 2np and
    // {2, 3} those of n-tile 2np + 1.
    DUO_UNROLL
    for (int np = 0; np < Tile::kNT / 2; ++np) {
      if (MASKED && np * 16 >= n_valid) continue;
      DUO_UNROLL
      for (int ks = 0; ks < Tile::kKSteps; ++ks) {
        uint32_t kf[4];
        ldmatrix_x4(kf, kS + k_lane + np * 16 * S + ks * 16);
        DUO_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          if (!on<ALL>(mt)) continue;
          mma_m16n8k16<T>(s[mt][2 * np], qf[mt][ks], kf[0], kf[1]);
          mma_m16n8k16<T>(s[mt][2 * np + 1], qf[mt][ks], kf[2], kf[3]);
        }
      }
    }
    // Online softmax. Lane (g, t) = (lane / 4, lane % 4) holds rows g (e = 0, 1) and g + 8 (e = 2, 3) of
    // every n-tile, at key columns nt * 8 + 2t + (e & 1).
    const int n_valid_lane = n_valid - 2 * (lane & 3);
    DUO_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      if (!on<ALL>(mt)) continue;
      if (MASKED) {
        DUO_UNROLL
        for (int nt = 0; nt < Tile::kNT; ++nt) {
          DUO_UNROLL
          for (int e = 0; e < 4; ++e) {
            if (nt * 8 + (e & 1) >= n_valid_lane) s[mt][nt][e] = -INFINITY;
          }
        }
      }
      DUO_UNROLL
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
        DUO_UNROLL
        for (int nt = 0; nt < Tile::kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = group_max<4>(mx);
        // scale > 0, so max(s) * scale is the max of the scaled scores; every block has a valid key,
        // so m_new is finite, and exp2(-inf) = 0 takes care of the first block and of masked keys.
        const float m_new = fmaxf(m_run[mt][r], mx * qk_scale);
        const float alpha = fast_exp2(m_run[mt][r] - m_new);
        m_run[mt][r] = m_new;
        float rowsum = 0.f;
        DUO_UNROLL
        for (int nt = 0; nt < Tile::kNT; ++nt) {
          DUO_UNROLL
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const float p = fast_exp2(fmaf(s[mt][nt][e], qk_scale, -m_new));
            s[mt][nt][e] = p;
            rowsum += p;
          }
        }
        l_run[mt][r] = l_run[mt][r] * alpha + rowsum;
        DUO_UNROLL
        for (int dt = 0; dt < Tile::kDT; ++dt) {
          acc[mt][dt][2 * r] *= alpha;
          acc[mt][dt][2 * r + 1] *= alpha;
        }
      }
    }
    // O += P V. The A fragment of P for keys [16 kk, 16 kk + 16) is the C fragment of n-tile 2kk (a0,
    // a1) and of n-tile 2kk + 1 (a2, a3). V's B fragments come through ldmatrix.trans: lanes 0-7 / 8-15
    // / 16-23 / 24-31 address (keys 0-7, dims 0-7) / (keys 8-15, dims 0-7) / (keys 0-7, dims 8-15) /
    // (keys 8-15, dims 8-15): registers {0, 1} are b0, b1 of dim tile 2dp, {2, 3} those of 2dp + 1.
    DUO_UNROLL
    for (int kk = 0; kk < Tile::kNT / 2; ++kk) {
      if (MASKED && kk * 16 >= n_valid) continue;
      uint32_t pa[MT][4];
      DUO_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      DUO_UNROLL
      for (int dp = 0; dp < Tile::kDT / 2; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vS + v_lane + kk * 16 * S + dp * 16);
        DUO_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          if (!on<ALL>(mt)) continue;
          mma_m16n8k16<T>(acc[mt][2 * dp], pa[mt], vf[0], vf[1]);
          mma_m16n8k16<T>(acc[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
        }
      }
    }
  }
};

template <class T, int D, int DP, int MT>
DUO_GLOBAL void DUO_LAUNCH_BOUNDS(128) attention_fwd_kernel(const AttnArgs a) {
  using Tile = AttnTile<D, DP, MT>;
  constexpr int S = Tile::kStride;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  // Broadcast: the compiler then knows the warp index (and every branch on it) is warp-uniform and
  // emits no convergence code around the shuffles and mma.sync below (measured: no WARPSYNC in SASS).
  const int warp = warp_broadcast(tid >> 5);
  const unsigned n_mtiles = static_cast<unsigned>(a.n_mtiles), H = static_cast<unsigned>(a.H);
  const int tile = static_cast<int>(blockIdx.x % n_mtiles);
  const unsigned bh = blockIdx.x / n_mtiles;  // < 2^31: 32-bit division
  const int64_t b = bh / H, h = bh % H;
  const int L = a.L;
  const int m0 = tile * Tile::kBM;

  const uint16_t* q_ptr = a.qkv + b * a.sqb + h * a.sqh;
  const uint16_t* k_ptr = q_ptr + a.sq3;
  const uint16_t* v_ptr = k_ptr + a.sq3;
  uint16_t* o_ptr = a.out + b * a.sob + h * D;

  uint16_t* sQ = reinterpret_cast<uint16_t*>(dynamic_smem());
  uint16_t* sK = sQ + Tile::kBM * S;
  uint16_t* sV = sK + 2 * kBlockN * S;

  // Columns [D, DP) are read by the mma but never written by the copies: zero them once.
  if constexpr (DP > D) {
    const uint4 zero{0u, 0u, 0u, 0u};
    for (int r = tid; r < Tile::kRows; r += Tile::kThreads) sts<uint4>(sQ + r * S + D, zero);
  }

  // Q tile: rows past L are zero-filled (their scores stay finite and are never stored).
  for (int i = tid; i < Tile::kBM * Tile::kChunks; i += Tile::kThreads) {
    const int r = i / Tile::kChunks, c = i % Tile::kChunks;
    const bool ok = m0 + r < L;
    cp_async16(sQ + r * S + c * 8, q_ptr + static_cast<int64_t>(ok ? m0 + r : 0) * a.sql + c * 8, ok);
  }
  cp_async_commit();

  // K and V rows [n0, n0 + 64) into `stage`; masked: rows past L are zero-filled.
  auto load_kv = [&](int n0, int stage, bool masked) {
    uint16_t* dk = sK + stage * kBlockN * S;
    uint16_t* dv = sV + stage * kBlockN * S;
    for (int i = tid; i < kBlockN * Tile::kChunks; i += Tile::kThreads) {
      const int r = i / Tile::kChunks, c = i % Tile::kChunks;
      const bool ok = !masked || n0 + r < L;
      const int64_t off = static_cast<int64_t>(ok ? n0 + r : 0) * a.sql + c * 8;
      cp_async16(dk + r * S + c * 8, k_ptr + off, ok);
      cp_async16(dv + r * S + c * 8, v_ptr + off, ok);
    }
  };

  const int n_full = L / kBlockN;
  const int n_blocks = n_full + (L % kBlockN != 0);
  load_kv(0, 0, n_full == 0);
  cp_async_commit();
  cp_async_wait<1>();  // the Q group has landed (K/V block 0 may still be in flight)
  __syncthreads();

  WarpTile<T, D, DP, MT> w;
  DUO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    const int row0 = (mt * kWarps + warp) * 16;
    w.active[mt] = m0 + row0 < L;
    DUO_UNROLL
    for (int ks = 0; ks < Tile::kKSteps; ++ks) {
      ldmatrix_x4(w.qf[mt][ks], sQ + (row0 + (lane & 15)) * S + ks * 16 + (lane >> 4) * 8);
    }
    DUO_UNROLL
    for (int dt = 0; dt < Tile::kDT; ++dt) {
      DUO_UNROLL
      for (int e = 0; e < 4; ++e) w.acc[mt][dt][e] = 0.f;
    }
    w.m_run[mt][0] = w.m_run[mt][1] = -INFINITY;
    w.l_run[mt][0] = w.l_run[mt][1] = 0.f;
  }
  const int k_lane = (((lane >> 4) << 3) + (lane & 7)) * S + ((lane >> 3) & 1) * 8;
  const int v_lane = (((lane >> 3) & 1) * 8 + (lane & 7)) * S + (lane >> 4) * 8;
  const bool any_active = w.active[0];        // a warp's later tiles lie below its first,
  const bool all_active = w.active[MT - 1];   // so its last one decides whether all are active

  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) {
      load_kv((j + 1) * kBlockN, (j + 1) & 1, j + 1 >= n_full);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // block j is visible to every warp
    const uint16_t* kS = sK + (j & 1) * kBlockN * S;
    const uint16_t* vS = sV + (j & 1) * kBlockN * S;
    if (all_active) {  // the common case: full query tiles
      if (j < n_full) w.template step<false, true>(kS, vS, kBlockN, k_lane, v_lane, lane, a.qk_scale);
      else w.template step<true, true>(kS, vS, L - j * kBlockN, k_lane, v_lane, lane, a.qk_scale);
    } else if constexpr (MT > 1) {  // a warp of the last query tile with some of its tiles past L
      if (any_active) {
        if (j < n_full) w.template step<false, false>(kS, vS, kBlockN, k_lane, v_lane, lane, a.qk_scale);
        else w.template step<true, false>(kS, vS, L - j * kBlockN, k_lane, v_lane, lane, a.qk_scale);
      }
    }
    __syncthreads();  // every warp is done with stage j & 1 before block j + 2 is copied into it
  }

  // Normalise, stage the O tile in the (now free) Q buffer, then 16-byte coalesced stores.
  DUO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    const int row = (mt * kWarps + warp) * 16 + (lane >> 2);
    DUO_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float inv = 1.f / group_sum<4>(w.l_run[mt][r]);
      DUO_UNROLL
      for (int dt = 0; dt < Tile::kDT; ++dt) {
        const int col = dt * 8 + 2 * (lane & 3);
        if (dt * 8 < D) {
          sts<uint32_t>(sQ + (row + 8 * r) * S + col,
                        pack2<T>(w.acc[mt][dt][2 * r] * inv, w.acc[mt][dt][2 * r + 1] * inv));
        }
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < Tile::kBM * Tile::kChunks; i += Tile::kThreads) {
    const int r = i / Tile::kChunks, c = i % Tile::kChunks;
    if (m0 + r < L) stg16(o_ptr + static_cast<int64_t>(m0 + r) * a.sol + c * 8, lds<uint4>(sQ + r * S + c * 8));
  }
}

template <class T, int D, int DP, int MT>
const char* launch(const AttentionParams& p, cudaStream_t stream) {
  using Tile = AttnTile<D, DP, MT>;
  auto kernel = attention_fwd_kernel<T, D, DP, MT>;
  const int64_t n_mtiles = (p.L + Tile::kBM - 1) / Tile::kBM;
  const int64_t blocks = n_mtiles * p.B * p.H;
  if (blocks > 0x7fffffff) return "attention: B * H * ceil(L / tile) exceeds the 2^31 - 1 blocks of a grid";
  if (const char* err = allow_smem(kernel, Tile::kSmemBytes)) return err;
  AttnArgs a;
  a.qkv = static_cast<const uint16_t*>(p.qkv);
  a.out = static_cast<uint16_t*>(p.out);
  a.sqb = p.stride_qb;
  a.sql = p.stride_ql;
  a.sq3 = p.stride_q3;
  a.sqh = p.stride_qh;
  a.sob = p.stride_ob;
  a.sol = p.stride_ol;
  a.L = static_cast<int>(p.L);
  a.H = static_cast<int>(p.H);
  a.n_mtiles = static_cast<int>(n_mtiles);
  a.qk_scale = p.scale * 1.4426950408889634f;
  DUO_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(Tile::kThreads), Tile::kSmemBytes, stream, a);
  return last_launch_error();
}

template <class T>
const char* dispatch_head_dim(const AttentionParams& p, cudaStream_t stream) {
  // (D, padded D, 16-row tiles per warp): two tiles per warp where registers allow (D <= 64).
  switch (p.D) {
    case 32: return launch<T, 32, 32, 2>(p, stream);
    case 48: return launch<T, 48, 48, 2>(p, stream);
    case 64: return launch<T, 64, 64, 2>(p, stream);
    case 72: return launch<T, 72, 80, 1>(p, stream);
    case 80: return launch<T, 80, 80, 1>(p, stream);
    case 96: return launch<T, 96, 96, 1>(p, stream);
    case 128: return launch<T, 128, 128, 1>(p, stream);
    default: return "attention: head dim not supported (32, 48, 64, 72, 80, 96, 128)";
  }
}

}  // namespace

bool attention_head_dim_supported(int64_t D) {
  return D == 32 || D == 48 || D == 64 || D == 72 || D == 80 || D == 96 || D == 128;
}

const char* attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.L < 0 || p.H < 0) return "attention: negative size";
  if (p.B == 0 || p.L == 0 || p.H == 0) return nullptr;
  if (p.L > 0x7fffffff - kBlockN) return "attention: L exceeds 2^31 - 65";
  if (!(p.scale > 0.f)) return "attention: scale must be positive";
  const int64_t strides[] = {p.stride_qb, p.stride_ql, p.stride_q3, p.stride_qh, p.stride_ob, p.stride_ol};
  for (int64_t s : strides) {
    if (s % kAttentionAlignElems) return "attention: every stride of qkv and out must be a multiple of 8 elements";
  }
  if (!aligned16(p.qkv) || !aligned16(p.out)) return "attention: qkv and out must be 16-byte aligned";
  if (p.dtype == DType::kF16) return dispatch_head_dim<f16>(p, stream);
  if (p.dtype == DType::kBF16) return dispatch_head_dim<bf16>(p, stream);
  return "attention: dtype must be float16 or bfloat16";
}

}  // namespace duo

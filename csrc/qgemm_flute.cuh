// The FLUTE qgemm kernel for memory-bound shapes (M <= 32 rows per launch).
//
//   y[m, n] = sum_g scales[g, n] * sum_{k in group g} x[m, k] * table[code(k, n)]
//
// Tensor cores compute y^T = W^T x^T with mma.sync.m16n8k16 (fp32 accumulate):
// A = table values of W^T (16 output features x 16 input features) come straight
// from the packed codes, whose layout (flute_jax/layout.py) puts a lane's codes
// in A-fragment order; B = x^T (16 k x 8 tokens) comes from shared memory via
// ldmatrix.
//
// The paper's three ideas:
//  1. Offline restructuring: a lane's 16-byte loads of a 256 x 16 unit hold the
//     codes of its A fragments for 16 k-tiles; no shuffles.
//  2. Vectorized lookup: a table of *pairs* (2^(2 bits) entries of half2/bf162)
//     maps two adjacent-k codes to one A register. It is stored 32 times,
//     interleaved so lane l always reads bank l: lookups never conflict.
//     At 2 bits a table of *quads* (2^8 entries: the two pairs of a code byte,
//     16 copies) gives two A registers per 64-bit load.
//     Scales are applied per group, in fp32, to the group's mma accumulator
//     (a few FFMAs per group instead of a multiply per weight pair).
//  3. Stream-K: the (128-column, 256-k) iteration space is split evenly over a
//     persistent grid (as many blocks as fit on the GPU). A column split between
//     blocks is fixed up by whichever block finishes its part last; it sums all
//     parts in block order, so results are bitwise deterministic.
//
// Pipeline: one producer warp streams codes, x and scales into kStages shared-
// memory stages (on sm_90 codes by one bulk copy of the TMA unit, x rows too
// from 9 rows on; else 16-byte cp.async; scales by cp.async); each stage has a "full"
// mbarrier (the producer's copies landed, and the bulk copy's bytes) and an
// "empty" one (all 256 consumer threads are done with it). Consumer warps never
// wait on each other inside the main loop, and they spend no instructions on
// addresses of global memory.
#pragma once

#include "flute_common.cuh"

namespace flute_jax {
namespace flute {

constexpr int kStages = 3;
constexpr int kXStride = kUnitK + 8;  // x row pitch in shared memory (halves): conflict-free ldmatrix

// Dynamic shared memory: the lookup table, then kStages pipeline stages. A stage holds
// the codes of a column's kWarps * kNB units (kNB N-blocks per consumer warp), its x rows
// and its scale rows.
template <int kBits, int kMBlocks, int kNB = 1>
struct Smem {
  static constexpr int kUnitWords = 128 * kBits;
  static constexpr int kColumn = kColumnN * kNB;  // output features per Stream-K column
  static constexpr int kCodeBytes = kWarps * kNB * kUnitWords * 4;
  static constexpr int kXBytes = 8 * kMBlocks * kXStride * 2;
  static constexpr int kScaleBytes = kScaleRows * kColumn * 2;
  static constexpr int kStageBytes = kCodeBytes + kXBytes + kScaleBytes;
  static constexpr int kDynamic = LookupTable<kBits>::kReserve + kStages * kStageBytes;
};

// The producer warp: fills stage s for each of the block's iterations in turn,
// after the consumers have released it, and arrives on its "full" barrier when
// the lane's copies have landed (32 arrivals complete the phase).
template <int kBits, typename T, int kMBlocks, int kNB>
__device__ __forceinline__ void Produce(const Params& p, int it_begin, int it_end, int lane, uint32_t stage0,
                                        uint32_t full0, uint32_t empty0) {
  using S = Smem<kBits, kMBlocks, kNB>;
  constexpr int kUnits = kWarps * kNB;  // units (N-blocks) per column
  const T* x = static_cast<const T*>(p.x);
  int c = it_begin / p.k_units, u = it_begin % p.k_units;
  int s = 0;
  uint32_t parity = 0;  // of stage s's current use
  for (int it = it_begin; it < it_end; ++it) {
    // Use r >= 1 of a stage waits for the consumers' release of use r - 1.
    if (it - it_begin >= kStages) ptx::MbarWait(empty0 + 8 * s, parity ^ 1);
    const uint32_t base = stage0 + s * S::kStageBytes;
    // x rows of this launch, k in [256 u, 256 u + 256), zero beyond K (the padded
    // codes there are table[0], not zero). Rows past M are left as they are: an
    // mma column depends only on its own x row (whatever it holds, NaN included),
    // and those outputs are never stored.
    const uint32_t x_dst = base + S::kCodeBytes;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Bulk copies by the TMA unit, whose bytes the stage's "full" barrier also
    // waits for: the column's codes (contiguous) in one, and from 9 rows on each
    // x row's k range in one. cp.async's 16-byte writes cost twice the ideal
    // shared-memory wavefronts (ncu, H200), and shared-memory bandwidth limited
    // the big shapes: 8192 x 57344 at M = 1 went 85 -> 75 us with the codes alone;
    // x by bulk copy gained 3% more at M = 16 (up to 8% on the 70B MLP) but lost
    // 1-3% at M = 8 (H200 A/B, 2026-11-30), so launches of 8 rows keep cp.async.
    constexpr bool kXBulk = kMBlocks >= 2;
    const uint32_t code_bytes = min(kUnits, p.n_blocks - c * kUnits) * S::kUnitWords * 4;
    const int k_valid = min(kUnitK, p.k - u * kUnitK);  // a multiple of 8: 16-byte rows
    // The expected bytes are set before any copy is issued.
    if (lane == 0) ptx::MbarExpectTx(full0 + 8 * s, code_bytes + (kXBulk ? p.m * 2 * k_valid : 0));
    __syncwarp();
    if (lane == 31)
      ptx::BulkCopyToShared(base, p.codes + (static_cast<int64_t>(u) * p.n_blocks + c * kUnits) * S::kUnitWords,
                            code_bytes, full0 + 8 * s);
    if constexpr (kXBulk) {
      if (lane < p.m)
        ptx::BulkCopyToShared(x_dst + lane * kXStride * 2, x + static_cast<int64_t>(lane) * p.k + u * kUnitK,
                              2 * k_valid, full0 + 8 * s);
      if (8 * lane >= k_valid)  // the last unit's k past K: zeros
        for (int row = 0; row < p.m; ++row) ptx::CpAsync16(x_dst + row * kXStride * 2 + 16 * lane, x, false);
    }
#else
    constexpr bool kXBulk = false;
    CopyCodes<kBits, 32, S::kColumn>(p, c, u, lane, base);
#endif
    if constexpr (!kXBulk) {
      const int kk = u * kUnitK + 8 * lane;
      const bool k_ok = kk < p.k;
      for (int row = 0; row < p.m; ++row)
        ptx::CpAsync16(x_dst + row * kXStride * 2 + 16 * lane, k_ok ? x + static_cast<int64_t>(row) * p.k + kk : x,
                       k_ok);
    }
    CopyScales<T, 32, S::kColumn>(p, c, u, lane, base + S::kCodeBytes + S::kXBytes);
    ptx::MbarArriveOnCopies(full0 + 8 * s);
    if (++u == p.k_units) { u = 0; ++c; }
    if (++s == kStages) { s = 0; parity ^= 1; }
  }
  ptx::CpAsyncWaitAll();  // leave no copy in flight at exit
}

// kFlushTiles: k-tiles summed in one fp32 accumulator before it is scaled (2 for
// group size 32, 4 for 64 (2 in the 32-row instance), 8 for 128 and up); a group never
// straddles a flush. kNB: N-blocks per consumer warp (columns of 128 kNB features). Two
// give each warp two independent mma chains on one x fragment, and two units of lookups
// to interleave.
template <int kBits, typename T, int kMBlocks, int kFlushTiles, int kNB = 1>
__global__ void __launch_bounds__(kThreads, kMBlocks == 4 ? 1 : 2) FluteQgemmKernel(const Params p) {
  using S = Smem<kBits, kMBlocks, kNB>;
  constexpr int kUnitWords = S::kUnitWords;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int it_begin = IterBegin(blockIdx.x, p), it_end = IterBegin(blockIdx.x + 1, p);
  const uint32_t full0 = ptx::SharedAddress(full_bar), empty0 = ptx::SharedAddress(empty_bar);
  const uint32_t smem_addr = ptx::SharedAddress(smem);
  using Table = LookupTable<kBits>;
  const uint32_t table_addr = (smem_addr + Table::kAlign - 1) & ~uint32_t(Table::kAlign - 1);
  uint32_t* pair_table = reinterpret_cast<uint32_t*>(smem + (table_addr - smem_addr));
  unsigned char* stages = reinterpret_cast<unsigned char*>(pair_table) + Table::kBytes;
  Stamp(0);
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      ptx::MbarInit(full0 + 8 * s, 32);       // the producer's lanes
      ptx::MbarInit(empty0 + 8 * s, kConsumers);  // every consumer thread
    }
  }
  __syncthreads();
  // Only the block's setup above overlaps the previous kernel's end (wait_prior).
  if (p.wait_prior) ptx::GridDependencyWait();
  if (warp == kWarps) {
    Produce<kBits, T, kMBlocks, kNB>(p, it_begin, it_end, lane, ptx::SharedAddress(stages), full0, empty0);
    return;
  }

  // Consumers: build the lookup table while the first stages load.
  const uint32_t lane_addr = BuildLookupTable<kBits, T>(p.table, pair_table, tid);
  Stamp(1);

  float acc[kNB][kMBlocks][4];
#pragma unroll
  for (int h = 0; h < kNB; ++h)
#pragma unroll
    for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[h][mb][j] = 0.f;

  const int r = lane >> 2, q = lane & 3;
  // ldmatrix row addresses: lanes 8j..8j+7 give the rows of matrix j =
  // (tile t + (j >> 1), k half j & 1).
  const uint32_t x_lane = 2 * ((lane & 7) * kXStride + 8 * ((lane >> 3) & 1) + 16 * (lane >> 4));
  int c = it_begin / p.k_units, u = it_begin % p.k_units;
  int s = 0;
  uint32_t parity = 0;
  for (int it = it_begin; it < it_end; ++it) {
    ptx::MbarWait(full0 + 8 * s, parity);
    if (it == it_begin) Stamp(2);  // the first stage has landed
    const unsigned char* base = stages + s * S::kStageBytes;
    // The warp's N-blocks h * kWarps + warp of the column; the last column may lack some.
    // With kNB = 2 only the first decides: a second one past N computes on stale codes
    // (in-range table entries) and zero scales, and FinishColumn never stores it.
    const bool warp_active = c * kWarps * kNB + warp < p.n_blocks;
    if (warp_active) {
      uint32_t w[kNB][4 * kBits];
#pragma unroll
      for (int h = 0; h < kNB; ++h)
        LoadCodes<kBits>(reinterpret_cast<const uint32_t*>(base) + (h * kWarps + warp) * kUnitWords, lane, w[h]);
      const uint32_t x_rows = ptx::SharedAddress(base + S::kCodeBytes) + x_lane;
      const T* ss = reinterpret_cast<const T*>(base + S::kCodeBytes + S::kXBytes) + warp * 16 + r;
      // Independent mma chains: at 8 rows and one N-block two accumulators, for even and
      // odd tiles; otherwise one per (N-block, 8-row block), already independent chains. A
      // second chain per block costs 4 registers per block, and at 96 registers mb2 spilled
      // in the main loop (ptxas; without it: no spills at g128, M = 16 2% faster on the H200).
      constexpr int kChains = kMBlocks == 1 && kNB == 1 ? 2 : 1;
      float part[kChains][kNB][kMBlocks][4];
      uint32_t b[kMBlocks][4];  // x fragments of tiles t and t + 1 (one ldmatrix.x4 each)
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        if (t % kFlushTiles == 0) {
#pragma unroll
          for (int ch = 0; ch < kChains; ++ch)
#pragma unroll
            for (int h = 0; h < kNB; ++h)
#pragma unroll
              for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
                for (int j = 0; j < 4; ++j) part[ch][h][mb][j] = 0.f;
        }
        uint32_t a[kNB][4];
#pragma unroll
        for (int h = 0; h < kNB; ++h) LookupFragment<kBits>(w[h], t, lane_addr, a[h]);
        if (t % 2 == 0) {
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb) ptx::LdMatrixX4(b[mb], x_rows + 2 * (mb * 8 * kXStride + 16 * t));
        }
#pragma unroll
        for (int h = 0; h < kNB; ++h)
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
            ptx::Mma<T>(part[t % kChains][h][mb], a[h], b[mb][2 * (t & 1)], b[mb][2 * (t & 1) + 1]);
        if (t % kFlushTiles == kFlushTiles - 1) {
          const int g = t >> p.group_shift;
#pragma unroll
          for (int h = 0; h < kNB; ++h) {
            const T* sh = ss + h * kColumnN + g * S::kColumn;
            const float s_lo = ToF32(sh[0]), s_hi = ToF32(sh[8]);
#pragma unroll
            for (int mb = 0; mb < kMBlocks; ++mb) {
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                float sum = part[0][h][mb][j];
#pragma unroll
                for (int ch = 1; ch < kChains; ++ch) sum += part[ch][h][mb][j];
                acc[h][mb][j] = fmaf(j < 2 ? s_lo : s_hi, sum, acc[h][mb][j]);
              }
            }
          }
        }
      }
    }
    // Release the stage to the producer: every consumer thread arrives after its
    // own reads of it (release semantics), the simplest order to check. One lane
    // per warp after __syncwarp() ran as fast, but compute-sanitizer's racecheck
    // flagged each reuse of a stage as a read/write hazard.
    ptx::MbarArrive(empty0 + 8 * s);

    // End of a segment: the column is done, or this block's range ends.
    if (u == p.k_units - 1 || it + 1 == it_end) {
      FinishColumn<T, kMBlocks, kNB>(p, c, c, static_cast<T*>(p.y), p.m, acc, &s_is_last);
#pragma unroll
      for (int h = 0; h < kNB; ++h)
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[h][mb][j] = 0.f;
    }
    if (++u == p.k_units) { u = 0; ++c; }
    if (++s == kStages) { s = 0; parity ^= 1; }
  }
  // With workspace counters, a block that used no counter still ends after the
  // kernel that zeroed them, so the stream's next operation runs after both (a
  // no-op for a plain launch on the call site's counters).
  if (tid == 0) ptx::GridDependencyWait();
  Stamp(6);
  StampBlock(it_end - it_begin);
}

}  // namespace flute
}  // namespace flute_jax

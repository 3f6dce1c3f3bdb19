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
//     Scales are applied per group, in fp32, to the group's mma accumulator
//     (a few FFMAs per group instead of a multiply per weight pair).
//  3. Stream-K: the (128-column, 256-k) iteration space is split evenly over a
//     persistent grid (as many blocks as fit on the GPU). A column split between
//     blocks is fixed up by whichever block finishes its part last; it sums all
//     parts in block order, so results are bitwise deterministic.
//
// Pipeline: one producer warp streams codes, x and scales into kStages shared-
// memory stages with 16-byte cp.async; each stage has a "full" mbarrier (the
// producer's copies landed) and an "empty" one (all 8 consumer warps are done
// with it). Consumer warps never wait on each other inside the main loop, and
// they spend no instructions on addresses of global memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_types.cuh"
#include "ptx.cuh"

namespace flute_jax {
namespace flute {

constexpr int kWarps = 8;                // consumer warps; each owns one 16-wide N-block of a column
constexpr int kConsumers = 32 * kWarps;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kColumnN = 16 * kWarps;    // output features per Stream-K column
constexpr int kStages = 3;
constexpr int kUnitK = 256;              // input features per iteration (one packed unit)
constexpr int kTiles = kUnitK / 16;
constexpr int kXStride = kUnitK + 8;     // x row pitch in shared memory (halves): conflict-free ldmatrix
constexpr int kScaleRows = 8;            // scale rows of one unit (group_rows >= 32, powers of two)
constexpr int kCopies = 32;              // pair-table copies, one per bank
constexpr int kConsumerBarrier = 1;      // named barrier of the consumer warps (0 is __syncthreads)

// Kernel arguments (plain values: the kernel is capture-safe).
struct Params {
  const void* x;          // [M, K] activations (this launch's rows start here)
  const uint32_t* codes;  // packed codes
  const void* scales;     // [G, N]
  const void* table;      // [2**bits]
  void* y;                // [M, N] (this launch's rows)
  float* partials;        // [2 * grid][m_tile][kColumnN] Stream-K partial sums
  int* counters;          // [columns] arrivals per split column (zeroed before launch)
  int m, k, n;            // this launch's rows (<= 8 * m-blocks), and the problem's K, N
  int n_blocks, k_units, columns;
  int groups;
  int group_shift;        // log2(group_rows / 16); 30 when there is a single group
  // Stream-K partition of columns * k_units (< 2^31) iterations: block b runs
  // iters_per_block + (b < extra_iters) of them, starting at IterBegin(b).
  int iters_per_block, extra_iters;
};

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

// Dynamic shared memory: the pair table, then kStages pipeline stages. The 2- and
// 3-bit tables sit at an address aligned to their size, so a lookup address is
// one LOP3 away from the code bits: (index << 7) | (table + 4 * lane) has no carries.
template <int kBits, int kMBlocks>
struct Smem {
  static constexpr int kUnitWords = 128 * kBits;
  static constexpr int kUnitChunks = kUnitWords / 4;  // 16-byte chunks of one warp's unit
  static constexpr int kCodeBytes = kWarps * kUnitWords * 4;
  static constexpr int kXBytes = 8 * kMBlocks * kXStride * 2;
  static constexpr int kScaleBytes = kScaleRows * kColumnN * 2;
  static constexpr int kStageBytes = kCodeBytes + kXBytes + kScaleBytes;
  static constexpr int kTableBytes = (1 << (2 * kBits)) * kCopies * 4;
  static constexpr int kTableAlign = kBits == 4 ? 16 : kTableBytes;  // 4-bit: PRMT + LEA, no alignment
  static constexpr int kDynamic = kTableBytes + (kTableAlign - 16) + kStages * kStageBytes;
};

// Stream-K bookkeeping in 32-bit integers (no 64-bit division on the device).
__device__ __forceinline__ int IterBegin(int b, const Params& p) {
  return b * p.iters_per_block + min(b, p.extra_iters);
}
__device__ __forceinline__ int BlockOf(int i, const Params& p) {
  const int big = p.extra_iters * (p.iters_per_block + 1);  // iterations of the longer blocks
  return i < big ? i / (p.iters_per_block + 1) : p.extra_iters + (i - big) / p.iters_per_block;
}
// Partial-sum slot of block b's part of column c: slot 0 for the column its range
// starts in, slot 1 for the column it ends in (a block has at most two split columns).
__device__ __forceinline__ int SlotOf(int b, int c, const Params& p) {
  return 2 * b + (c == IterBegin(b, p) / p.k_units ? 0 : 1);
}

// The pair index held in bits [shift, shift + width) of `word`, moved to bits
// [7 + at, 7 + width + at) and OR-ed into `addr` (whose bits there are zero):
// a shift and one LOP3.
template <int kWidth, int kAt = 0>
__device__ __forceinline__ uint32_t PairBits(uint32_t word, int shift, uint32_t addr) {
  constexpr uint32_t mask = ((1u << kWidth) - 1) << (7 + kAt);
  const int to = 7 + kAt;
  const uint32_t moved = shift >= to ? word >> (shift - to) : word << (to - shift);
  return (moved & mask) | addr;
}

// The producer warp: fills stage s for each of the block's iterations in turn,
// after the consumers have released it, and arrives on its "full" barrier when
// the lane's copies have landed (32 arrivals complete the phase).
template <int kBits, typename T, int kMBlocks>
__device__ __forceinline__ void Produce(const Params& p, int it_begin, int it_end, int lane, uint32_t stage0,
                                        uint32_t full0, uint32_t empty0) {
  using S = Smem<kBits, kMBlocks>;
  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);
  int c = it_begin / p.k_units, u = it_begin % p.k_units;
  int s = 0;
  uint32_t parity = 0;  // of stage s's current use
  for (int it = it_begin; it < it_end; ++it) {
    // Use r >= 1 of a stage waits for the consumers' release of use r - 1.
    if (it - it_begin >= kStages) ptx::MbarWait(empty0 + 8 * s, parity ^ 1);
    const uint32_t base = stage0 + s * S::kStageBytes;
    // Codes: the column's (up to) 8 units at k-block u are contiguous in memory;
    // units past N (last column) are skipped and their warps idle.
    const uint32_t* src = p.codes + (static_cast<int64_t>(u) * p.n_blocks + c * kWarps) * S::kUnitWords;
    const int valid = min(kWarps, p.n_blocks - c * kWarps) * S::kUnitChunks;
#pragma unroll
    for (int i = 0; i < kWarps * S::kUnitChunks / 32; ++i) {
      const int chunk = lane + 32 * i;
      ptx::CpAsync16If(base + 16 * chunk, src + 4 * chunk, chunk < valid);
    }
    // x rows of this launch, k in [256 u, 256 u + 256), zero beyond K (the padded
    // codes there are table[0], not zero). Rows past M are left as they are: an
    // mma column depends only on its own x row (whatever it holds, NaN included),
    // and those outputs are never stored.
    const int kk = u * kUnitK + 8 * lane;
    const bool k_ok = kk < p.k;
    for (int row = 0; row < p.m; ++row)
      ptx::CpAsync16(base + S::kCodeBytes + row * kXStride * 2 + 16 * lane,
                     k_ok ? x + static_cast<int64_t>(row) * p.k + kk : x, k_ok);
    // The unit's scale rows, zero past its last group and past N. Zero, not left
    // stale: a group past K still meets its tiles' sums (zero, from the zero x) in
    // an FMA, and stale bytes could be Inf or NaN (compute-sanitizer found this).
    const int g_lo = (u * kTiles) >> p.group_shift;
    const int g_hi = min(p.groups - 1, (u * kTiles + kTiles - 1) >> p.group_shift);
#pragma unroll
    for (int i = 0; i < kScaleRows * (kColumnN / 8) / 32; ++i) {
      const int idx = lane + 32 * i, row = idx / (kColumnN / 8), chunk = idx % (kColumnN / 8);
      const int g = g_lo + row, nn = c * kColumnN + 8 * chunk;
      const bool ok = g <= g_hi && nn < p.n;
      ptx::CpAsync16(base + S::kCodeBytes + S::kXBytes + row * kColumnN * 2 + 16 * chunk,
                     ok ? scales + static_cast<int64_t>(g) * p.n + nn : scales, ok);
    }
    ptx::MbarArriveOnCopies(full0 + 8 * s);
    if (++u == p.k_units) { u = 0; ++c; }
    if (++s == kStages) { s = 0; parity ^= 1; }
  }
  ptx::CpAsyncWaitAll();  // leave no copy in flight at exit
}

// kFlushTiles: k-tiles summed in one fp32 accumulator before it is scaled (2 for
// group sizes 32 and 64, 8 for 128 and up); a group never straddles a flush.
template <int kBits, typename T, int kMBlocks, int kFlushTiles>
__global__ void __launch_bounds__(kThreads, kMBlocks == 4 ? 1 : 2) FluteQgemmKernel(const Params p) {
  using S = Smem<kBits, kMBlocks>;
  constexpr int kMTile = 8 * kMBlocks;
  constexpr int kUnitWords = S::kUnitWords;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int it_begin = IterBegin(blockIdx.x, p), it_end = IterBegin(blockIdx.x + 1, p);
  const uint32_t full0 = ptx::SharedAddress(full_bar), empty0 = ptx::SharedAddress(empty_bar);
  const uint32_t smem_addr = ptx::SharedAddress(smem);
  const uint32_t table_addr = (smem_addr + S::kTableAlign - 1) & ~uint32_t(S::kTableAlign - 1);
  uint32_t* pair_table = reinterpret_cast<uint32_t*>(smem + (table_addr - smem_addr));
  unsigned char* stages = reinterpret_cast<unsigned char*>(pair_table) + S::kTableBytes;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      ptx::MbarInit(full0 + 8 * s, 32);       // the producer's lanes
      ptx::MbarInit(empty0 + 8 * s, kWarps);  // one arrival per consumer warp
    }
  }
  __syncthreads();
  if (warp == kWarps) {
    Produce<kBits, T, kMBlocks>(p, it_begin, it_end, lane, ptx::SharedAddress(stages), full0, empty0);
    return;
  }

  // Consumers: build the pair table while the first stages load.
  {
    using T2 = typename Vec2<T>::type;
    __shared__ T table[1 << kBits];  // one global read per entry, then shared-memory reads
    if (tid < (1 << kBits)) table[tid] = static_cast<const T*>(p.table)[tid];
    ptx::NamedBarrier(kConsumerBarrier, kConsumers);
    // One pair value per (entry, 16-byte chunk of its 32 copies): a few wide stores per thread.
    constexpr int kChunks = (1 << (2 * kBits)) * kCopies / 4;
#pragma unroll
    for (int i = tid; i < kChunks; i += kConsumers) {
      const int e = i / (kCopies / 4);
      int even, odd;
      if constexpr (kBits == 3) {  // 2-bit plane pair in bits 0..3, 1-bit plane pair in bits 4..5
        even = (e & 3) | (((e >> 4) & 1) << 2);
        odd = ((e >> 2) & 3) | (((e >> 5) & 1) << 2);
      } else {
        even = e & ((1 << kBits) - 1);
        odd = e >> kBits;
      }
      T2 v;
      v.x = table[even];
      v.y = table[odd];
      const uint32_t word = *reinterpret_cast<uint32_t*>(&v);
      reinterpret_cast<uint4*>(pair_table)[i] = make_uint4(word, word, word, word);
    }
    ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  }
  // This lane's copy of entry 0, opaque to the compiler: otherwise it splits the
  // sum into its terms and spends a second LOP3 per lookup re-joining them.
  uint32_t lane_addr = table_addr + 4 * lane;
  asm volatile("" : "+r"(lane_addr));

  float acc[kMBlocks][4];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[mb][j] = 0.f;

  const int r = lane >> 2, q = lane & 3;
  // ldmatrix row addresses: lanes 8j..8j+7 give the rows of matrix j =
  // (tile t + (j >> 1), k half j & 1).
  const uint32_t x_lane = 2 * ((lane & 7) * kXStride + 8 * ((lane >> 3) & 1) + 16 * (lane >> 4));
  int c = it_begin / p.k_units, u = it_begin % p.k_units;
  int s = 0;
  uint32_t parity = 0;
  for (int it = it_begin; it < it_end; ++it) {
    ptx::MbarWait(full0 + 8 * s, parity);
    const unsigned char* base = stages + s * S::kStageBytes;
    const bool warp_active = c * kWarps + warp < p.n_blocks;
    if (warp_active) {
      // This lane's code words for the unit, plane by plane (16-byte loads).
      const uint32_t* unit = reinterpret_cast<const uint32_t*>(base) + warp * kUnitWords;
      uint32_t w[4 * kBits];
#pragma unroll
      for (int j = 0; j < kBits; ++j) {
        const uint4 v = *reinterpret_cast<const uint4*>(unit + 128 * j + 4 * lane);
        w[4 * j] = v.x; w[4 * j + 1] = v.y; w[4 * j + 2] = v.z; w[4 * j + 3] = v.w;
      }
      const uint32_t x_rows = ptx::SharedAddress(base + S::kCodeBytes) + x_lane;
      const T* ss = reinterpret_cast<const T*>(base + S::kCodeBytes + S::kXBytes) + warp * 16 + r;
      // Two accumulators, for even and odd tiles: two independent mma chains.
      float part[2][kMBlocks][4];
      uint32_t b[kMBlocks][4];  // x fragments of tiles t and t + 1 (one ldmatrix.x4 each)
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        if (t % kFlushTiles == 0) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
              for (int j = 0; j < 4; ++j) part[h][mb][j] = 0.f;
        }
        uint32_t a[4];
#pragma unroll
        for (int pr = 0; pr < 4; ++pr) {
          uint32_t addr;
          if constexpr (kBits == 4) {
            // Byte pr of the word is the pair index: PRMT, then one LEA (index * 128 + lane copy).
            addr = (__byte_perm(w[t], 0, 0x4440 + pr) << 7) + lane_addr;
          } else if constexpr (kBits == 2) {
            addr = PairBits<4>(w[t >> 1], 16 * (t & 1) + 4 * pr, lane_addr);
          } else {  // low 4 bits of the pair index from the 2-bit plane, high 2 from the 1-bit plane
            addr = PairBits<2, 4>(w[8 + (t >> 2)], 8 * (t & 3) + 2 * pr,
                                  PairBits<4>(w[t >> 1], 16 * (t & 1) + 4 * pr, lane_addr));
          }
          a[pr] = ptx::LdShared(addr);
        }
        if (t % 2 == 0) {
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb) ptx::LdMatrixX4(b[mb], x_rows + 2 * (mb * 8 * kXStride + 16 * t));
        }
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb) {
          ptx::Mma<T>(part[t & 1][mb], a, b[mb][2 * (t & 1)], b[mb][2 * (t & 1) + 1]);
        }
        if (t % kFlushTiles == kFlushTiles - 1) {
          const int g = t >> p.group_shift;
          const float s_lo = ToF32(ss[g * kColumnN]), s_hi = ToF32(ss[g * kColumnN + 8]);
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb) {
            acc[mb][0] = fmaf(s_lo, part[0][mb][0] + part[1][mb][0], acc[mb][0]);
            acc[mb][1] = fmaf(s_lo, part[0][mb][1] + part[1][mb][1], acc[mb][1]);
            acc[mb][2] = fmaf(s_hi, part[0][mb][2] + part[1][mb][2], acc[mb][2]);
            acc[mb][3] = fmaf(s_hi, part[0][mb][3] + part[1][mb][3], acc[mb][3]);
          }
        }
      }
    }
    // Release the stage to the producer once every lane's reads of it are done.
    __syncwarp();
    if (lane == 0) ptx::MbarArrive(empty0 + 8 * s);

    // End of a segment: the column is done, or this block's range ends.
    if (u == p.k_units - 1 || it + 1 == it_end) {
      const int first_block = BlockOf(c * p.k_units, p);
      const int last_block = BlockOf((c + 1) * p.k_units - 1, p);
      const int n0 = c * kColumnN + warp * 16 + r;
      T* y = static_cast<T*>(p.y);
      auto store = [&](int mb, int j, float v) {
        const int m = mb * 8 + 2 * q + (j & 1), nn = n0 + 8 * (j >> 1);
        if (m < p.m && nn < p.n) y[static_cast<int64_t>(m) * p.n + nn] = FromF32<T>(v);
      };
      auto slot_index = [&](int mb, int j) {
        return (mb * 8 + 2 * q + (j & 1)) * kColumnN + warp * 16 + r + 8 * (j >> 1);
      };
      if (first_block == last_block) {  // the whole column was ours
        if (warp_active)
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j) store(mb, j, acc[mb][j]);
      } else {
        float* mine = p.partials + static_cast<int64_t>(SlotOf(blockIdx.x, c, p)) * kMTile * kColumnN;
        if (warp_active)
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j) __stcg(mine + slot_index(mb, j), acc[mb][j]);
        // Publish the part: the barrier orders every consumer's stores before
        // thread 0's release (the pattern of CUTLASS's split-K semaphore); the
        // last arriver's acquire, then the barrier, order the reads of all parts.
        ptx::NamedBarrier(kConsumerBarrier, kConsumers);
        if (tid == 0) s_is_last = ptx::AtomicAddAcqRel(&p.counters[c], 1) == last_block - first_block;
        ptx::NamedBarrier(kConsumerBarrier, kConsumers);
        if (s_is_last && warp_active) {
          // Every part has landed: sum them in block order (deterministic).
          float sum[kMBlocks][4];
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j) sum[mb][j] = 0.f;
#pragma unroll 4
          for (int b = first_block; b <= last_block; ++b) {
            const float* part = p.partials + static_cast<int64_t>(SlotOf(b, c, p)) * kMTile * kColumnN;
#pragma unroll
            for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
              for (int j = 0; j < 4; ++j) sum[mb][j] += __ldcg(part + slot_index(mb, j));
          }
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j) store(mb, j, sum[mb][j]);
        }
      }
#pragma unroll
      for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mb][j] = 0.f;
    }
    if (++u == p.k_units) { u = 0; ++c; }
    if (++s == kStages) { s = 0; parity ^= 1; }
  }
}

}  // namespace flute
}  // namespace flute_jax

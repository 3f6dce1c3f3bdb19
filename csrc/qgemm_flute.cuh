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
// Codes, x and scales stream through a 3-stage cp.async pipeline of 16-byte loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_types.cuh"

namespace flute_jax {
namespace flute {

constexpr int kWarps = 8;                // each warp owns one 16-wide N-block of a column
constexpr int kThreads = 32 * kWarps;
constexpr int kColumnN = 16 * kWarps;    // output features per Stream-K column
constexpr int kStages = 3;
constexpr int kUnitK = 256;              // input features per iteration (one packed unit)
constexpr int kTiles = kUnitK / 16;
constexpr int kXStride = kUnitK + 8;     // x row pitch in shared memory (halves): conflict-free ldmatrix
constexpr int kScaleRows = 8;            // scale rows of one unit (group_rows >= 32, powers of two)
constexpr int kCopies = 32;              // pair-table copies, one per bank

// Kernel arguments (plain values: the kernel is capture-safe).
struct Params {
  const void* x;          // [M, K] activations (this launch's rows start here)
  const uint32_t* codes;  // packed codes
  const void* scales;     // [G, N]
  const void* table;      // [2**bits]
  void* y;                // [M, N] (this launch's rows)
  float* partials;        // [2 * grid][m_tile][kColumnN] Stream-K partial sums
  int* counters;          // [columns] arrivals per split column (zeroed before launch)
  int m, k, n;            // this launch's rows, and the problem's K, N
  int n_blocks, k_units, columns;
  int groups;
  int group_shift;        // log2(group_rows / 16); 30 when there is a single group
  int grid;
};

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src-size 0 reads nothing and fills 16 zero bytes.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t LdShared(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Shared-memory sizes of one pipeline stage (dynamic shared memory) and of the
// pair table (static shared memory, so its address folds into the loads).
template <int kBits, int kMBlocks>
struct Smem {
  static constexpr int kUnitWords = 128 * kBits;
  static constexpr int kCodeBytes = kWarps * kUnitWords * 4;
  static constexpr int kXBytes = 8 * kMBlocks * kXStride * 2;
  static constexpr int kScaleBytes = kScaleRows * kColumnN * 2;
  static constexpr int kStageBytes = kCodeBytes + kXBytes + kScaleBytes;
  static constexpr int kTableWords = (1 << (2 * kBits)) * kCopies;
  static constexpr int kDynamic = kStages * kStageBytes;
};

// Stream-K bookkeeping: block b runs iterations [IterStart(b), IterStart(b + 1)).
__device__ __forceinline__ int64_t IterStart(int64_t b, int64_t total, int64_t grid) {
  return b * total / grid;
}
__device__ __forceinline__ int BlockOf(int64_t i, int64_t total, int64_t grid) {
  int64_t b = i * grid / total;
  while (b + 1 < grid && IterStart(b + 1, total, grid) <= i) ++b;
  return static_cast<int>(b);
}
// Partial-sum slot of block b's part of column c: slot 0 for the column its range
// starts in, slot 1 for the column it ends in (a block has at most two split columns).
__device__ __forceinline__ int SlotOf(int b, int c, int64_t total, int64_t grid, int k_units) {
  return 2 * b + (c == IterStart(b, total, grid) / k_units ? 0 : 1);
}

// Byte offset in the pair table of the pair index held in bits [shift, shift + width)
// of `word`, for this lane's copy: entry * 128 + lane * 4 (lane4 = 4 * lane, bits
// 2..6, never overlapping the entry bits). Compiles to a shift and one LOP3.
template <int kWidth>
__device__ __forceinline__ uint32_t PairOffset(uint32_t word, int shift, uint32_t lane4) {
  constexpr uint32_t mask = ((1u << kWidth) - 1) << 7;
  const uint32_t moved = shift >= 7 ? word >> (shift - 7) : word << (7 - shift);
  return (moved & mask) | lane4;
}

// kFlushTiles: k-tiles summed in one fp32 accumulator before it is scaled (2 for
// group sizes 32 and 64, 8 for 128 and up); a group never straddles a flush.
template <int kBits, typename T, int kMBlocks, int kFlushTiles>
__global__ void __launch_bounds__(kThreads, kMBlocks == 4 ? 1 : 2) FluteQgemmKernel(const Params p) {
  using S = Smem<kBits, kMBlocks>;
  constexpr int kMTile = 8 * kMBlocks;
  constexpr int kUnitWords = S::kUnitWords;

  extern __shared__ __align__(16) unsigned char stages[];
  __shared__ __align__(16) uint32_t pair_table[S::kTableWords];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t total = static_cast<int64_t>(p.columns) * p.k_units;
  const int64_t it_begin = IterStart(blockIdx.x, total, p.grid);
  const int64_t it_end = IterStart(blockIdx.x + 1, total, p.grid);
  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);

  // Loader position (column, unit) of the next iteration to fetch; advanced
  // incrementally so the loop has no 64-bit division.
  int load_c = static_cast<int>(it_begin / p.k_units), load_u = static_cast<int>(it_begin % p.k_units);
  int64_t load_it = it_begin;
  // Each thread's share of a stage is fixed: kBits 16-byte chunks of codes,
  // kMBlocks of x (row warp + 8 j, chunk lane) and at most one of scales.
  const int scale_row = tid / (kColumnN / 8), scale_chunk = tid % (kColumnN / 8);
  auto load_next = [&](int stage) {
    unsigned char* base = stages + stage * S::kStageBytes;
    if (load_it < it_end) {
      const int c = load_c, u = load_u;
      // Codes: the column's (up to) 8 units at k-block u are contiguous in memory.
      const uint32_t* src = p.codes + (static_cast<int64_t>(u) * p.n_blocks + c * kWarps) * kUnitWords;
      const int valid_chunks = min(kWarps, p.n_blocks - c * kWarps) * (kUnitWords / 4);
#pragma unroll
      for (int j = 0; j < kBits; ++j) {
        const int i = tid + kThreads * j;
        CpAsync16(base + 16 * i, i < valid_chunks ? src + 4 * i : p.codes, i < valid_chunks);
      }
      // x rows of this launch, k in [256 u, 256 u + 256), zero beyond M and K.
      const int kk = u * kUnitK + 8 * lane;
#pragma unroll
      for (int j = 0; j < kMBlocks; ++j) {
        const int row = warp + 8 * j;
        const bool ok = row < p.m && kk < p.k;
        CpAsync16(base + S::kCodeBytes + row * kXStride * 2 + 16 * lane,
                  ok ? x + static_cast<int64_t>(row) * p.k + kk : x, ok);
      }
      // The unit's scale rows; zero beyond G and N.
      if (scale_row < kScaleRows) {
        const int g_lo = (u * kTiles) >> p.group_shift;
        const int g_hi = min(p.groups - 1, (u * kTiles + kTiles - 1) >> p.group_shift);
        const int g = g_lo + scale_row, nn = c * kColumnN + 8 * scale_chunk;
        const bool ok = g <= g_hi && nn < p.n;
        CpAsync16(base + S::kCodeBytes + S::kXBytes + scale_row * kColumnN * 2 + 16 * scale_chunk,
                  ok ? scales + static_cast<int64_t>(g) * p.n + nn : scales, ok);
      }
      ++load_it;
      if (++load_u == p.k_units) { load_u = 0; ++load_c; }
    }
    CpAsyncCommit();  // an empty group past the end keeps the wait counts uniform
  };

  // Start the pipeline, then build the pair table while the first loads fly.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_next(s);
  {
    using T2 = typename Vec2<T>::type;
    __shared__ T table[1 << kBits];  // one global read per entry, then shared-memory reads
    if (tid < (1 << kBits)) table[tid] = static_cast<const T*>(p.table)[tid];
    __syncthreads();
    // One pair value per (entry, 16-byte chunk of its 32 copies): a few wide stores per thread.
    constexpr int kChunks = (1 << (2 * kBits)) * kCopies / 4;
#pragma unroll
    for (int i = tid; i < kChunks; i += kThreads) {
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
  }
  const uint32_t lane4 = 4 * lane;
  const uint32_t table_addr = static_cast<uint32_t>(__cvta_generic_to_shared(pair_table));
  const uint32_t lane_addr = table_addr + lane4;  // this lane's copy of entry 0

  float acc[kMBlocks][4];
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[mb][j] = 0.f;

  const int r = lane >> 2, q = lane & 3;
  int c = static_cast<int>(it_begin / p.k_units), u = static_cast<int>(it_begin % p.k_units);
  int stage = 0;
  for (int64_t it = it_begin; it < it_end; ++it) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // this stage landed for all threads; the stage refilled next is free
    load_next(stage == 0 ? kStages - 1 : stage - 1);

    const unsigned char* base = stages + stage * S::kStageBytes;
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
      const T* xs = reinterpret_cast<const T*>(base + S::kCodeBytes);
      const T* ss = reinterpret_cast<const T*>(base + S::kCodeBytes + S::kXBytes) + warp * 16 + r;
      // ldmatrix row addresses: lanes 8j..8j+7 give the rows of matrix j =
      // (tile t + (j >> 1), k half j & 1).
      const T* x_rows = xs + (lane & 7) * kXStride + 8 * ((lane >> 3) & 1) + 16 * (lane >> 4);
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
          uint32_t off;
          if constexpr (kBits == 4) {
            // Byte pr of the word is the pair index: PRMT, then one LEA (index * 128 + lane copy).
            a[pr] = LdShared((__byte_perm(w[t], 0, 0x4440 + pr) << 7) + lane_addr);
            continue;
          } else if constexpr (kBits == 2) {
            off = PairOffset<4>(w[t >> 1], 16 * (t & 1) + 4 * pr, lane4);
          } else {  // low 4 bits of the pair index from the 2-bit plane, high 2 from the 1-bit plane
            off = PairOffset<4>(w[t >> 1], 16 * (t & 1) + 4 * pr, lane4) |
                  (PairOffset<2>(w[8 + (t >> 2)], 8 * (t & 3) + 2 * pr, 0) << 4);
          }
          a[pr] = LdShared(table_addr + off);
        }
        if (t % 2 == 0) {
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb) LdMatrixX4(b[mb], x_rows + mb * 8 * kXStride + 16 * t);
        }
#pragma unroll
        for (int mb = 0; mb < kMBlocks; ++mb) {
          Mma<T>(part[t & 1][mb], a, b[mb][2 * (t & 1)], b[mb][2 * (t & 1) + 1]);
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

    // End of a segment: the column is done, or this block's range ends.
    if (u == p.k_units - 1 || it + 1 == it_end) {
      const int first_block = BlockOf(static_cast<int64_t>(c) * p.k_units, total, p.grid);
      const int last_block = BlockOf(static_cast<int64_t>(c + 1) * p.k_units - 1, total, p.grid);
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
        float* mine = p.partials + static_cast<int64_t>(SlotOf(blockIdx.x, c, total, p.grid, p.k_units)) *
                                       kMTile * kColumnN;
        if (warp_active)
#pragma unroll
          for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
            for (int j = 0; j < 4; ++j) __stcg(mine + slot_index(mb, j), acc[mb][j]);
        __threadfence();
        __syncthreads();
        if (tid == 0) s_is_last = atomicAdd(&p.counters[c], 1) == last_block - first_block;
        __syncthreads();
        if (s_is_last) {
          // Every part has landed: sum them in block order (deterministic).
          __threadfence();
          if (warp_active) {
            float sum[kMBlocks][4];
#pragma unroll
            for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
              for (int j = 0; j < 4; ++j) sum[mb][j] = 0.f;
            for (int b = first_block; b <= last_block; ++b) {
              const float* part = p.partials + static_cast<int64_t>(SlotOf(b, c, total, p.grid, p.k_units)) *
                                                   kMTile * kColumnN;
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
      }
#pragma unroll
      for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mb][j] = 0.f;
    }
    if (++u == p.k_units) { u = 0; ++c; }
    stage = stage == kStages - 1 ? 0 : stage + 1;
  }
  CpAsyncWait<0>();  // leave no copy in flight at exit
}

}  // namespace flute
}  // namespace flute_jax

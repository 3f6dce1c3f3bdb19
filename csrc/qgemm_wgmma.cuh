// The FLUTE qgemm kernel for batches and prefill (M > 16 rows), on Hopper's
// warpgroup tensor-core instruction (wgmma, sm_90a).
//
// Same packed layout, pair table, producer/consumer pipeline and Stream-K as the
// decode kernel (qgemm_flute.cuh). What changes:
//  - The multiply: each of the two consumer warpgroups computes kNB x 64 output
//    features x kMTile tokens with wgmma.m64n{kMTile}k16. A = the table values of
//    W^T straight from the lookups, in registers (a warp's A fragments are the
//    decode kernel's: each warp of the warpgroup holds its own 16 features); B =
//    x^T from shared memory, read by the tensor cores themselves. The decode
//    kernel re-reads the weight for every 32 rows and spends a ldmatrix per 8
//    rows; here one pass over the weight serves 128 rows, and x costs the
//    consumers no instructions.
//  - All of M in one launch: the Stream-K columns are (x tile, feature column)
//    pairs, so a large M gives every block many iterations instead of one short
//    launch per tile.
//  - The column, for large problems: 256 features, each consumer warp owning two
//    N-blocks 128 features apart (kNB = 2; else 128 features and one). That halves
//    the x bytes per multiply-add (x is most of what a stage brings, and the
//    consumers wait for stages); it pays where there are enough Stream-K
//    iterations per block, else the coarser split and the bigger fix-up cost more
//    (qgemm_plan.h decides).
//
// Scales multiply the looked-up values (one HMUL2 per A register) instead of the
// accumulators: wgmma accumulates asynchronously, and a per-group accumulator
// would have to be waited for and flushed at every group.
//
// Overlap: each k-tile's wgmmas are one commit group, and its A fragments go to
// a ring of four register buffers; the lookups of tile t run while the tensor
// cores work on tiles t - 3 .. t - 1 (wgmma.wait_group 3 before a buffer is
// rewritten). A stage goes back to the producer once every wgmma reading it has completed.
//
// x tile in shared memory: wgmma's B operand in the K-major, 128-byte-swizzled
// layout. An "atom" is 8 tokens x 64 k (8 rows of 128 bytes, 1 KB-aligned); the
// 16-byte chunk c of row r sits at r * 128 + (c ^ r) * 16, so the tensor cores'
// reads of 8 rows at one k hit 8 different bank groups. (The plain layout, rows
// of one k 4 KB apart, ran 4.5x below the tensor-core rate on an H100.) Atoms of
// consecutive 8-token blocks are adjacent (1 KB apart); the four 64-k quarters of
// a unit follow each other. A quarter is exactly what the TMA unit writes for a box
// of 64 k x the tile's rows with CU_TENSOR_MAP_SWIZZLE_128B at a 1 KB-aligned address.
#pragma once

#include "flute_common.cuh"
#include "wgmma.cuh"

namespace flute_jax {
namespace flute {

// Block: the two consumer warpgroups (warps 0-7) and a producer warpgroup (warps
// 8-11). Registers move from the producers to the consumers (setmaxnreg): the
// consumers hold up to 128 accumulators, two buffers of A fragments and the codes.
constexpr int kProducers = 128;
constexpr int kTileThreads = kConsumers + kProducers;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 * 40 + 256 * 232 <= 64K
constexpr int kAtomBytes = 1024;  // 8 tokens x 64 k: one swizzle atom
constexpr int kAtomK = 64;
// A fragments in flight: k-tile t's lookups fill buffer t % kABuffers while the
// wgmmas of the kABuffers - 1 tiles before it may still run (kTiles is a multiple).
constexpr int kABuffers = 4;

// Dynamic shared memory: the pair table, then (1 KB-aligned) the pipeline
// stages: x tile, codes, scales. 128-row tiles fit two stages, 64-row tiles three,
// 32-row tiles four (at M <= 32 the kernel streams the weight: more bytes in flight).
// kNB: N-blocks per consumer warp (warp w owns N-blocks w, w + 8, ...), so a
// Stream-K column has kNB * 128 features. With two, the 4-bit pair table keeps 16
// copies (16 KB; lanes l and l + 16 share one) to make room for the stages; the
// 3-bit table is small and keeps 32; 2 bits take the quad table (32 KB).
template <int kBits, int kMTile, int kNB>
struct TileSmem {
  static constexpr int kColumn = kNB * kColumnN;
  static constexpr int kCopies = kBits == 4 && kNB == 2 ? 16 : 32;
  // At 2 bits the quad table (flute_common.cuh): one 64-bit load per two A registers.
  using Table = LookupTable<kBits, kCopies>;
  static constexpr int kStages = kMTile == 128 ? 2 : kMTile == 64 ? 3 : 4;
  static constexpr int kQuarterBytes = kMTile / 8 * kAtomBytes;  // the x tile's atoms of one 64-k quarter
  static constexpr int kXBytes = (kUnitK / kAtomK) * kQuarterBytes;
  static constexpr int kCodeBytes = kNB * kWarps * 128 * kBits * 4;
  static constexpr int kScaleBytes = kScaleRows * kColumn * 2;
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kScaleBytes;
  static constexpr int kDynamic = Table::kReserve + (kAtomBytes - 16) + kStages * kStageBytes;
  static_assert(kDynamic <= 227 * 1024, "over Hopper's shared memory per block");
};

// The producer warpgroup. One thread has the TMA unit copy each stage's x tile (four
// boxes of 64 k x kMTile rows; x_map, the generic address of the kernel's tensor-map
// argument, lays them out in the swizzled atoms above; rows past M and k past K
// arrive as zeros) and the column's codes (one bulk copy:
// units past N are skipped), all counted against the stage's "full" barrier; the 128
// threads copy the scale rows with cp.async and arrive on the barrier once those
// land. (With cp.async for x and codes too, the producers issued about 28% of the
// block's instructions, on the schedulers the consumers need: ncu, H200.) `lane` is
// the thread's index in the producer warpgroup.
template <int kBits, typename T, int kMTile, int kNB>
__device__ __forceinline__ void ProduceTiles(const Params& p, uint64_t x_map, int it_begin, int it_end, int lane,
                                             uint32_t stage0, uint32_t full0, uint32_t empty0) {
  using S = TileSmem<kBits, kMTile, kNB>;
  constexpr int kUnits = S::kColumn / 16;             // 16-feature units of a column
  constexpr uint32_t kUnitBytes = 128 * kBits * 4;  // one unit's codes
  const int cc0 = it_begin / p.k_units;
  int tile = cc0 / p.columns, c = cc0 % p.columns, u = it_begin % p.k_units;
  int s = 0;
  uint32_t parity = 0;  // of stage s's current use
  for (int it = it_begin; it < it_end; ++it) {
    if (it - it_begin >= S::kStages) ptx::MbarWait(empty0 + 8 * s, parity ^ 1);
    const uint32_t base = stage0 + s * S::kStageBytes, full = full0 + 8 * s;
    if (lane == 0) {
      const int units = min(kUnits, p.n_blocks - c * kUnits);
      // The expected bytes are set before any copy is issued (and before this thread's
      // arrival, without which the phase cannot complete).
      ptx::MbarExpectTx(full, S::kXBytes + units * kUnitBytes);
#pragma unroll
      for (int q = 0; q < kUnitK / kAtomK; ++q)
        ptx::TensorCopy2d(base + q * S::kQuarterBytes, x_map, u * kUnitK + q * kAtomK, tile * kMTile, full);
      ptx::BulkCopyToShared(base + S::kXBytes,
                            p.codes + (static_cast<int64_t>(u) * p.n_blocks + c * kUnits) * (128 * kBits),
                            units * kUnitBytes, full);
    }
    CopyScales<T, kProducers, S::kColumn>(p, c, u, lane, base + S::kXBytes + S::kCodeBytes);
    ptx::MbarArriveOnCopies(full);
    if (++u == p.k_units) {
      u = 0;
      if (++c == p.columns) { c = 0; ++tile; }
    }
    if (++s == S::kStages) { s = 0; parity ^= 1; }
  }
  ptx::CpAsyncWaitAll();  // leave no copy in flight at exit
}

// v * (s, s) for a packed pair v of T.
template <typename T>
__device__ __forceinline__ uint32_t ScalePair(uint32_t v, typename Vec2<T>::type s) {
  using T2 = typename Vec2<T>::type;
  T2 pair = *reinterpret_cast<T2*>(&v);
  pair = __hmul2(pair, s);
  return *reinterpret_cast<uint32_t*>(&pair);
}

template <int kBits, typename T, int kMTile, int kNB>
__global__ void __launch_bounds__(kTileThreads, 1)
    FluteTileKernel(const Params p, const __grid_constant__ CUtensorMap x_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = TileSmem<kBits, kMTile, kNB>;
  using T2 = typename Vec2<T>::type;
  constexpr int kStages = S::kStages;
  constexpr int kChunks = kMTile / 8;  // 8-token column blocks of the accumulator

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int it_begin = IterBegin(blockIdx.x, p), it_end = IterBegin(blockIdx.x + 1, p);
  const uint32_t full0 = ptx::SharedAddress(full_bar), empty0 = ptx::SharedAddress(empty_bar);
  const uint32_t smem_addr = ptx::SharedAddress(smem);
  const uint32_t table_addr = (smem_addr + S::Table::kAlign - 1) & ~uint32_t(S::Table::kAlign - 1);
  uint32_t* pair_table = reinterpret_cast<uint32_t*>(smem + (table_addr - smem_addr));
  const uint32_t table_end = table_addr + S::Table::kBytes;
  unsigned char* stages = smem + (((table_end + kAtomBytes - 1) & ~uint32_t(kAtomBytes - 1)) - smem_addr);
  Stamp(0);
  if (tid == kConsumers) ptx::PrefetchTensorMap(reinterpret_cast<uint64_t>(&x_map));  // the TMA thread
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      ptx::MbarInit(full0 + 8 * s, kProducers);  // every producer thread's copies
      ptx::MbarInit(empty0 + 8 * s, kConsumers);  // every consumer thread
    }
  }
  __syncthreads();
  if (p.wait_prior) ptx::GridDependencyWait();  // (as in qgemm_flute.cuh)
  if (warp >= kWarps) {
    ptx::SetMaxRegisters<kProducerRegs, false>();
    ProduceTiles<kBits, T, kMTile, kNB>(p, reinterpret_cast<uint64_t>(&x_map), it_begin, it_end, tid - kConsumers,
                                        ptx::SharedAddress(stages), full0, empty0);
    return;
  }
  ptx::SetMaxRegisters<kConsumerRegs, true>();

  const uint32_t lane_addr = BuildLookupTable<kBits, T, S::kCopies>(p.table, pair_table, tid);
  Stamp(1);
  const int r = lane >> 2;

  float acc[kNB][kChunks][4];
#pragma unroll
  for (int h = 0; h < kNB; ++h)
#pragma unroll
    for (int i = 0; i < kChunks; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[h][i][j] = 0.f;

  int s = 0, pending = -1;  // pending: a stage whose wgmmas may still be running
  uint32_t parity = 0;
  auto release = [&](int stage) {  // every consumer thread, as in the decode kernel
    ptx::MbarArrive(empty0 + 8 * stage);
  };
  // Segments: the block's iterations of one Stream-K column. The accumulators are
  // touched only after a segment's loop, behind wgmma.wait_group 0, so the loop over a
  // segment's units has no path that reads them while wgmmas run: with the end of a
  // segment tested inside that loop, ptxas could not tell and waited for every wgmma
  // at the end of each unit ("warpgroup.wait is injected", C7517), draining the
  // tensor cores 16 k-tiles apart.
  for (int it = it_begin; it < it_end;) {
    const int cc = it / p.k_units;  // the segment's column
    const int segment_end = min(it_end, (cc + 1) * p.k_units);
    for (; it < segment_end; ++it) {
      ptx::MbarWait(full0 + 8 * s, parity);
      if (it == it_begin) Stamp(2);  // the first stage has landed
      // (No proxy fence: x, the only operand the tensor cores read from shared memory,
      // was written by the TMA unit, in the same async proxy.)
      const unsigned char* base = stages + s * S::kStageBytes;
      uint32_t w[kNB][4 * kBits];
#pragma unroll
      for (int h = 0; h < kNB; ++h)
        LoadCodes<kBits>(reinterpret_cast<const uint32_t*>(base + S::kXBytes) + (h * kWarps + warp) * 128 * kBits,
                         lane, w[h]);
      const T* ss = reinterpret_cast<const T*>(base + S::kXBytes + S::kCodeBytes) + warp * 16 + r;
      // k-tile t's B: 32 bytes at (t % 4) * 32 into the rows of quarter t / 4's atoms.
      const uint64_t desc0 = ptx::MatrixDescriptorSwizzle128(ptx::SharedAddress(base), kAtomBytes);
      uint32_t a[kABuffers][kNB][4];  // a ring of single k-tiles' A fragments per N-block
      T2 s_lo[kNB], s_hi[kNB];        // rows r and r + 8 of each N-block's 16 features
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        // Buffer t % kABuffers was read by k-tile t - kABuffers (of this unit or the
        // last): wait until at most kABuffers - 1 tiles' wgmmas are still running.
        ptx::WgmmaWait<kABuffers - 1>();
        if (t == kABuffers - 1 && pending >= 0) {  // the previous unit's wgmmas have all completed
          release(pending);
          pending = -1;
        }
        // Scale groups are >= 32 rows and start at even k-tiles: one pair of scale
        // reads per N-block serves two k-tiles.
        if (t % 2 == 0) {
          const int g = t >> p.group_shift;
#pragma unroll
          for (int h = 0; h < kNB; ++h) {
            s_lo[h].x = s_lo[h].y = ss[g * S::kColumn + h * kColumnN];
            s_hi[h].x = s_hi[h].y = ss[g * S::kColumn + h * kColumnN + 8];
          }
        }
#pragma unroll
        for (int h = 0; h < kNB; ++h) {
          uint32_t (&frag)[4] = a[t % kABuffers][h];
          LookupFragment<kBits, S::kCopies>(w[h], t, lane_addr, frag);
          frag[0] = ScalePair<T>(frag[0], s_lo[h]);
          frag[1] = ScalePair<T>(frag[1], s_hi[h]);
          frag[2] = ScalePair<T>(frag[2], s_lo[h]);
          frag[3] = ScalePair<T>(frag[3], s_hi[h]);
        }
        ptx::WgmmaFence();
#pragma unroll
        for (int h = 0; h < kNB; ++h)
          ptx::Wgmma<kMTile, T>(acc[h], a[t % kABuffers][h],
                                desc0 + (((t / 4) * S::kQuarterBytes + (t % 4) * 32) >> 4));
        ptx::WgmmaCommit();
      }
      pending = s;
      if (++s == kStages) { s = 0; parity ^= 1; }
    }
    // End of the segment: the column is done, or this block's range ends.
    ptx::WgmmaWait<0>();
#pragma unroll
    for (int h = 0; h < kNB; ++h)
#pragma unroll
      for (int i = 0; i < kChunks; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) ptx::KeepOrder(acc[h][i][j]);
    release(pending);
    pending = -1;
    const int tile = cc / p.columns, c = cc % p.columns;
    FinishColumn<T, kChunks, kNB>(p, cc, c, static_cast<T*>(p.y) + static_cast<int64_t>(tile) * kMTile * p.y_cols,
                                  min(kMTile, p.m - tile * kMTile), acc, &s_is_last);
#pragma unroll
    for (int h = 0; h < kNB; ++h)
#pragma unroll
      for (int i = 0; i < kChunks; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[h][i][j] = 0.f;
  }
  if (tid == 0) ptx::GridDependencyWait();  // with workspace counters: end after the kernel that zeroed them (FinishColumn)
  Stamp(6);
  StampBlock(it_end - it_begin);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace flute
}  // namespace flute_jax

// Instantiations, planning and launch of the FLUTE kernel (see qgemm_flute.cuh).
// Templates: bits {2, 3, 4} x dtype {f16, bf16} x m-blocks {1, 2, 4} x flush
// period {2, 8}, and period 4 for 1 and 2 m-blocks; and for 1 m-block, every period with two
// N-blocks per warp (DecodeNBlocks). The group size itself is a run-time argument.
//
// Each launch needs its Stream-K counters at zero. The call site's own counters
// (call_counters.h) are zero already: the kernel leaves them so, and on sm_90 it starts
// as a programmatic dependent of the stream's previous kernel, which every thread waits
// for before reading an operand (Params::wait_prior; +~1% of an 8B decode step). Workspace
// counters are zeroed per launch: on sm_90 a one-block kernel zeroes them and the
// FLUTE kernel (decode or tile) starts at once as its programmatic dependent,
// waiting for it only where a block first touches a counter (flute_common.cuh,
// FinishColumn): a memset would sit on the critical path of every call (H200, 8B
// decode loop: +7% tokens/s without it).
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "kernel_attributes.h"
#include "qgemm_flute.cuh"
#include "qgemm_flute.h"
#include "qgemm_wgmma.h"

namespace flute_jax {
namespace {

// Tiles per scale flush: the group's k-tiles (2 for group size 32, 4 for 64), 8 for larger
// groups. A flush costs ~13 instructions per warp (scale loads and conversions, the FADDs
// of the two chains, FFMAs), so at group size 64 a flush every 2 tiles spent ~50 per 256-k
// unit on flushes that period 4 does not need (SASS, sm_90a, 8-row launch: 2-bit 257 -> 204
// instructions per unit, 3-bit 440 -> 387, 4-bit 353 -> 304). The decode kernel's time
// follows its instructions per unit, if at about a quarter of their ratio: period 4 made
// group size 64 1.03-1.11x faster (H200, session 19). The 32-row launch (m_blocks 4, which Hopper does
// not take: M > 16 goes to the tile kernel there) keeps period 2 for both, to keep the
// template count down.
int FlushTiles(int64_t group_rows, int64_t groups, int m_blocks) {
  if (groups == 1 || group_rows > 64) return 8;
  return group_rows == 64 && m_blocks < 4 ? 4 : 2;
}

// Calls `fn` with the kernel instance for (bits, bf16, m_blocks, flush, N-blocks per warp)
// and its shared-memory size. Two N-blocks per warp exist for the 8-row launch only
// (DecodeNBlocks); elsewhere `nb` is 1.
template <typename Fn>
cudaError_t WithKernel(int bits, bool bf16, int m_blocks, int flush, int nb, Fn&& fn) {
  auto pick = [&](auto bits_c, auto type_c) -> cudaError_t {
    constexpr int kBits = decltype(bits_c)::value;
    using T = typename decltype(type_c)::type;
    auto by_flush = [&](auto mb_c) -> cudaError_t {
      constexpr int kMB = decltype(mb_c)::value;
      constexpr int smem = flute::Smem<kBits, kMB>::kDynamic;
      if constexpr (kMB == 1) {
        if (nb == 2) {
          constexpr int smem2 = flute::Smem<kBits, kMB, 2>::kDynamic;
          return flush == 2   ? fn(flute::FluteQgemmKernel<kBits, T, kMB, 2, 2>, smem2)
                 : flush == 4 ? fn(flute::FluteQgemmKernel<kBits, T, kMB, 4, 2>, smem2)
                              : fn(flute::FluteQgemmKernel<kBits, T, kMB, 8, 2>, smem2);
        }
      }
      if constexpr (kMB < 4) {
        if (flush == 4) return fn(flute::FluteQgemmKernel<kBits, T, kMB, 4>, smem);
      }
      return flush == 2 ? fn(flute::FluteQgemmKernel<kBits, T, kMB, 2>, smem)
                        : fn(flute::FluteQgemmKernel<kBits, T, kMB, 8>, smem);
    };
    switch (m_blocks) {
      case 1: return by_flush(std::integral_constant<int, 1>{});
      case 2: return by_flush(std::integral_constant<int, 2>{});
      default: return by_flush(std::integral_constant<int, 4>{});
    }
  };
  struct Bf16 { using type = __nv_bfloat16; };
  struct F16 { using type = __half; };
  switch (bits) {
    case 2: return bf16 ? pick(std::integral_constant<int, 2>{}, Bf16{}) : pick(std::integral_constant<int, 2>{}, F16{});
    case 3: return bf16 ? pick(std::integral_constant<int, 3>{}, Bf16{}) : pick(std::integral_constant<int, 3>{}, F16{});
    default: return bf16 ? pick(std::integral_constant<int, 4>{}, Bf16{}) : pick(std::integral_constant<int, 4>{}, F16{});
  }
}

// Raises the kernel's dynamic shared-memory limit, with all of L1/shared as
// shared memory so the planned blocks per SM really fit and the persistent grid
// runs in one wave (once per device and instance).
template <typename Kernel>
cudaError_t Prepare(Kernel kernel, int smem) {
  return SetKernelAttributesOnce(reinterpret_cast<const void*>(kernel), smem, /*max_shared_carveout=*/true);
}

// Blocks of one kernel instance that fit on a multiprocessor, cached per instance.
int BlocksPerSm(int bits, bool bf16, int m_blocks, int flush, int nb) {
  static std::atomic<int> cache[3][2][3][3][2];  // 0 = not yet known
  std::atomic<int>& slot =
      cache[bits - 2][bf16][m_blocks == 1 ? 0 : m_blocks == 2 ? 1 : 2][flush == 2 ? 0 : flush == 4 ? 1 : 2][nb - 1];
  int known = slot.load(std::memory_order_relaxed);
  if (known > 0) return known;
  int blocks = 0;
  const cudaError_t status = WithKernel(bits, bf16, m_blocks, flush, nb, [&](auto kernel, int smem) {
    cudaError_t s = Prepare(kernel, smem);
    if (s != cudaSuccess) return s;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, flute::kThreads, smem);
  });
  if (status != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls are unaffected
    return 0;
  }
  slot.store(blocks, std::memory_order_relaxed);
  return blocks;
}

int CudaSmCount() {
  static std::atomic<int> cached{0};
  int known = cached.load(std::memory_order_relaxed);
  if (known > 0) return known;
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  cached.store(count, std::memory_order_relaxed);
  return count;
}

// Zeroes the Stream-K counters for the launch after it, which it lets start at
// once: that launch waits for this one only where it first touches a counter.
__global__ void ZeroCountersKernel(int* counters, int count) {
  ptx::LaunchDependents();
  for (int i = threadIdx.x; i < count; i += blockDim.x) counters[i] = 0;
}

}  // namespace

template <typename... Extra>
cudaError_t LaunchWithCounters(void (*kernel)(flute::Params, Extra...), int grid, int threads, int smem,
                               cudaStream_t stream, int count, bool counters_zero, const flute::Params& p,
                               const Extra&... extra) {
  // sm_90 code may start before the stream's previous kernel ends; older code must not
  const bool dependent = DependentLaunchAllowed() && KernelBinaryVersion(reinterpret_cast<const void*>(kernel)) >= 90;
  if (counters_zero) {
    // The call site's counters are zero already. As a programmatic dependent of the
    // previous kernel (whatever wrote the operands), the grid's launch and setup
    // overlap that kernel's end; every thread waits for it before reading an operand.
    if (!dependent || !DependentOnPriorAllowed())
      return LaunchKernel(kernel, grid, threads, smem, stream, false, p, extra...);
    flute::Params waiting = p;
    waiting.wait_prior = 1;
    return LaunchKernel(kernel, grid, threads, smem, stream, true, waiting, extra...);
  }
  // Workspace counters: a zeroing kernel, then this grid as its dependent, which waits
  // for it where it first needs a counter.
  if (dependent) {
    ZeroCountersKernel<<<1, 512, 0, stream>>>(p.counters, count);
  } else {
    const cudaError_t s = cudaMemsetAsync(p.counters, 0, int64_t{count} * 4, stream);
    if (s != cudaSuccess) return s;
  }
  const cudaError_t s = cudaGetLastError();
  if (s != cudaSuccess) return s;
  return LaunchKernel(kernel, grid, threads, smem, stream, dependent, p, extra...);
}
// The decode kernel's signature, and the tile kernel's (which also takes x's tensor map).
template cudaError_t LaunchWithCounters<>(void (*)(flute::Params), int, int, int, cudaStream_t, int, bool,
                                          const flute::Params&);
template cudaError_t LaunchWithCounters<CUtensorMap>(void (*)(flute::Params, CUtensorMap), int, int, int,
                                                     cudaStream_t, int, bool, const flute::Params&,
                                                     const CUtensorMap&);

// FLUTE_JAX_TILE=<rows>x<column_n> (e.g. 64x128) in the environment forces the tile
// kernel's x tile (32, 64 or 128 rows) and column width (128 or 256 features), for
// measuring the plan's own choice against the others; other values are ignored. Read at
// every plan, so the lowering's workspace size and the call agree within a process.
namespace {
struct TileForce {
  int rows = 0, column_n = 0;
};
TileForce ForcedTile() {
  TileForce forced;
  const char* value = std::getenv("FLUTE_JAX_TILE");
  int rows = 0, column_n = 0;
  char tail = 0;
  if (value != nullptr && std::sscanf(value, "%dx%d%c", &rows, &column_n, &tail) == 2 &&
      (rows == 32 || rows == 64 || rows == 128) && (column_n == kFluteColumnN || column_n == kFluteTileColumnN)) {
    forced.rows = rows;
    forced.column_n = column_n;
  }
  return forced;
}
}  // namespace

namespace {
// Stream-K iterations per block (256-feature columns x 256-k units, over the grid of the
// two-N-block instance) from which the 8-row launch gives each warp two N-blocks, for
// bits 2, 3, 4. A warp then runs two units' lookups and mma chains on one x fragment,
// which pays where every block runs many iterations; where columns are few, 256-wide
// columns halve the iterations and double the fix-up, and small shapes lose. H200, session
// 19, one build with FLUTE_JAX_DECODE_NB=2 against 1, g128, M = 1 (M = 8 alike):
//   70B gate/up (8192 x 57344): 2-bit 64.0 -> 55.8 us, 3-bit 78.6 -> 72.1, 4-bit 74.2 -> 71.6;
//   70B down (28672 x 8192): 1.07x / 1.03x / 1.00x; 8B gate/up (4096 x 28672): 1.05x / 0.98x / 0.97x;
//   70B qkv (8192 x 10240): 0.94x / 0.84x / 0.98x; 8B o (4096 x 4096): 0.64x / 0.67x / 0.83x.
// The 4-bit instance fits one block per multiprocessor (shared memory: its 32 KB pair table
// and 3 stages of 40 KB), the 2- and 3-bit ones two (H200 plans, session 20). A 2-stage ring,
// which fits two 4-bit blocks, lost (session 20, forced, geomean of the 8 Llama-3 shapes, g128,
// M = 1, against the one-N-block kernel: 4-bit 0.78x vs 0.94x with 3 stages; 3-bit 0.87x vs
// 0.88x), so it was dropped. The 3-bit threshold came down from 20 to 10 once its two blocks
// per multiprocessor were known (session 21, same measurement, g128 and g64, M = 1 and 8):
// 70B down with 13.6 iterations per block 1.00-1.05x, 8B gate/up with 6.8 0.97-1.02x, 70B qkv
// with 4.8 0.83-0.87x.
constexpr int kTwoNBlocksMinIterations[3] = {6, 10, 40};

// N-blocks per consumer warp of the decode kernel (1, or 2 for the 8-row launch by the rule
// above). FLUTE_JAX_DECODE_NB=1 or 2 in the environment forces it, for measuring the rule.
// Read at every plan, like FLUTE_JAX_TILE, so the lowering's workspace size and the call agree.
int DecodeNBlocks(int bits, bool bf16, int m_blocks, int flush, int64_t k, int64_t n, int sm_count) {
  if (m_blocks != 1) return 1;
  const char* forced = std::getenv("FLUTE_JAX_DECODE_NB");
  if (forced != nullptr && (forced[0] == '1' || forced[0] == '2') && forced[1] == 0) return forced[0] - '0';
  const int blocks = BlocksPerSm(bits, bf16, 1, flush, 2);
  if (blocks <= 0) return 1;
  const int64_t iterations = ((n + 2 * kFluteColumnN - 1) / (2 * kFluteColumnN)) * ((k + kFluteUnitK - 1) / kFluteUnitK);
  return iterations >= int64_t{kTwoNBlocksMinIterations[bits - 2]} * sm_count * blocks ? 2 : 1;
}
}  // namespace

FlutePlan MakeFlutePlan(int64_t m, int64_t k, int64_t n, int64_t group_rows, int bits, bool is_half_type,
                        bool bf16, bool want_wgmma) {
  if (!FluteApplies(m, k, n, group_rows, is_half_type)) return FlutePlan{};
  const int64_t groups = (k + group_rows - 1) / group_rows;
  const int sm_count = CudaSmCount();
  if (sm_count <= 0) return FlutePlan{};
  const bool wgmma = want_wgmma && DeviceHasWgmma();
  if (!wgmma) {
    const int m_blocks = FluteMBlocks(m);
    const int flush = FlushTiles(group_rows, groups, m_blocks);
    const int nb = DecodeNBlocks(bits, bf16, m_blocks, flush, k, n, sm_count);
    const int blocks = BlocksPerSm(bits, bf16, m_blocks, flush, nb);
    return PlanFlute(m, k, n, group_rows, is_half_type, sm_count, blocks, false, 0, kFluteColumnN * nb);
  }
  // The tile kernels run one block per multiprocessor (shared memory); the
  // column width depends on the grid, the grid on the instance's occupancy.
  const TileForce forced = ForcedTile();
  const int rows = forced.rows ? forced.rows : FluteTileRows(m, k, n, sm_count);
  const int narrow_blocks = FluteTileBlocksPerSm(bits, bf16, rows, kFluteColumnN);
  const int column_n =
      forced.column_n ? forced.column_n : FluteTileColumnN(m, k, n, rows, int64_t{sm_count} * narrow_blocks);
  const int blocks = column_n == kFluteColumnN ? narrow_blocks : FluteTileBlocksPerSm(bits, bf16, rows, column_n);
  return PlanFlute(m, k, n, group_rows, is_half_type, sm_count, blocks, true, rows, column_n);
}

cudaError_t LaunchQgemmFlute(cudaStream_t stream, bool bf16, const void* x, const uint32_t* codes,
                             const void* scales, const void* table, void* y, void* workspace, int* call_counters,
                             const QgemmDims& d, const FlutePlan& plan) {
  flute::Params p;
  p.wait_prior = 0;
  p.epilogue = d.epilogue;
  p.y_cols = static_cast<int>(OutputColumns(d.n, d.epilogue));
  p.codes = codes;
  p.scales = scales;
  p.table = table;
  p.partials = static_cast<float*>(workspace);
  const bool counters_zero = call_counters != nullptr;
  p.counters = counters_zero ? call_counters
                             : reinterpret_cast<int*>(static_cast<char*>(workspace) + FluteCounterOffset(plan));
  p.k = static_cast<int>(d.k);
  p.n = static_cast<int>(d.n);
  p.n_blocks = static_cast<int>(d.n_blocks);
  p.k_units = plan.k_units;
  p.columns = plan.columns;
  p.groups = static_cast<int>(d.groups);
  int shift = 0;
  while ((int64_t{16} << shift) < d.group_rows) ++shift;
  p.group_shift = d.groups == 1 ? 30 : shift;  // group_rows = 16 << shift (a power of two)
  const int iterations = plan.row_tiles * plan.columns * plan.k_units;  // < 2^31 (PlanFlute)
  p.iters_per_block = iterations / plan.grid;                            // >= 1: grid <= iterations
  p.extra_iters = iterations % plan.grid;
  const int counters = static_cast<int>(FluteCounterCount(plan));  // <= iterations
  if (plan.wgmma) {  // one launch for all of M
    p.m = static_cast<int>(d.m);
    p.x = x;
    p.y = y;
    CUtensorMap x_map;
    const cudaError_t s = EncodeTileXMap(&x_map, x, d.m, d.k, plan.rows_per_launch, bf16);
    if (s != cudaSuccess) return s;
    return LaunchFluteTile(stream, static_cast<int>(d.bits), bf16, plan.rows_per_launch, plan.column_n, plan.grid,
                           counters, counters_zero, p, x_map);
  }
  const int flush = FlushTiles(d.group_rows, d.groups, plan.m_blocks);
  constexpr int kElementBytes = 2;
  for (int64_t m0 = 0; m0 < d.m; m0 += plan.rows_per_launch) {
    p.m = static_cast<int>(std::min<int64_t>(plan.rows_per_launch, d.m - m0));
    p.x = static_cast<const char*>(x) + m0 * d.k * kElementBytes;
    p.y = static_cast<char*>(y) + m0 * p.y_cols * kElementBytes;
    const int nb = plan.column_n / kFluteColumnN;
    const cudaError_t status = WithKernel(static_cast<int>(d.bits), bf16, plan.m_blocks, flush, nb, [&](auto kernel, int smem) {
      const cudaError_t s = Prepare(kernel, smem);
      if (s != cudaSuccess) return s;
      return LaunchWithCounters(kernel, plan.grid, flute::kThreads, smem, stream, counters, counters_zero, p);
    });
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace flute_jax

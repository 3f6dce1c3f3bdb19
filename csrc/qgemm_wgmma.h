// Host entry points of the wgmma tile kernel (qgemm_wgmma.cuh), for the launcher
// in qgemm_flute.cu. Only CUDA translation units include this.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>

namespace flute_jax {
namespace flute {
struct Params;
}  // namespace flute

// Blocks of the tile kernel (bits, bf16 or f16, 32, 64 or 128 rows, 128- or 256-feature
// columns) that fit on a multiprocessor of the current device; 0 when it cannot run.
int FluteTileBlocksPerSm(int bits, bool bf16, int m_tile, int column_n);

// Launches kernel(p, extra...) on `grid` blocks of `threads`, with `smem` bytes of dynamic
// shared memory. With `counters_zero` (the call site's counters, call_counters.h)
// a plain launch. Otherwise it first zeroes the `count` Stream-K counters at
// p.counters: sm_90 code starts at once as a programmatic dependent of a small
// zeroing kernel, older code after a memset (qgemm_flute.cu).
// `extra`: the kernel's arguments after p (the tile kernel's x tensor map); instances
// for the decode and tile kernels' signatures.
template <typename... Extra>
cudaError_t LaunchWithCounters(void (*kernel)(flute::Params, Extra...), int grid, int threads, int smem,
                               cudaStream_t stream, int count, bool counters_zero, const flute::Params& p,
                               const Extra&... extra);

// Describes x ([m, k] of bf16 or f16, rows k elements apart) for the tile kernel's
// producer: boxes of 64 k x m_tile rows, 128-byte swizzled, zeros outside x. The
// encoder is the driver's, reached through the runtime (no link to libcuda).
cudaError_t EncodeTileXMap(CUtensorMap* map, const void* x, int64_t m, int64_t k, int m_tile, bool bf16);

// Launches the tile kernel on `grid` blocks (LaunchWithCounters for its `counters`).
cudaError_t LaunchFluteTile(cudaStream_t stream, int bits, bool bf16, int m_tile, int column_n, int grid,
                            int counters, bool counters_zero, const flute::Params& p, const CUtensorMap& x_map);

}  // namespace flute_jax

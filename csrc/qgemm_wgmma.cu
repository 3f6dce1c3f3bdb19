// Instantiations and launch of the wgmma tile kernel (see qgemm_wgmma.cuh).
// Templates: bits {2, 3, 4} x dtype {f16, bf16} x rows {32, 64, 128} x column {128, 256}. The sm_80 pass
// compiles empty bodies; the host launches them only on compute capability 9.0.
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <atomic>
#include <type_traits>

#include "kernel_attributes.h"
#include "qgemm_wgmma.cuh"
#include "qgemm_flute.h"
#include "qgemm_wgmma.h"

namespace flute_jax {
namespace {

// Calls `fn` with the kernel instance for (bits, bf16, m_tile, column_n) and its
// shared-memory size.
template <typename Fn>
cudaError_t WithTileKernel(int bits, bool bf16, int m_tile, int column_n, Fn&& fn) {
  auto pick = [&](auto bits_c, auto type_c) -> cudaError_t {
    constexpr int kBits = decltype(bits_c)::value;
    using T = typename decltype(type_c)::type;
    auto by_rows = [&](auto nb_c) -> cudaError_t {
      constexpr int kNB = decltype(nb_c)::value;
      if (m_tile == 32)
        return fn(flute::FluteTileKernel<kBits, T, 32, kNB>, flute::TileSmem<kBits, 32, kNB>::kDynamic);
      if (m_tile == 64)
        return fn(flute::FluteTileKernel<kBits, T, 64, kNB>, flute::TileSmem<kBits, 64, kNB>::kDynamic);
      return fn(flute::FluteTileKernel<kBits, T, 128, kNB>, flute::TileSmem<kBits, 128, kNB>::kDynamic);
    };
    return column_n == 256 ? by_rows(std::integral_constant<int, 2>{}) : by_rows(std::integral_constant<int, 1>{});
  };
  struct Bf16 { using type = __nv_bfloat16; };
  struct F16 { using type = __half; };
  switch (bits) {
    case 2: return bf16 ? pick(std::integral_constant<int, 2>{}, Bf16{}) : pick(std::integral_constant<int, 2>{}, F16{});
    case 3: return bf16 ? pick(std::integral_constant<int, 3>{}, Bf16{}) : pick(std::integral_constant<int, 3>{}, F16{});
    default: return bf16 ? pick(std::integral_constant<int, 4>{}, Bf16{}) : pick(std::integral_constant<int, 4>{}, F16{});
  }
}

// The dynamic shared-memory limit (once per device and instance).
template <typename Kernel>
cudaError_t Prepare(Kernel kernel, int smem) {
  return SetKernelAttributesOnce(reinterpret_cast<const void*>(kernel), smem, /*max_shared_carveout=*/false);
}

}  // namespace

bool DeviceHasWgmma() {
  static std::atomic<int> cache[64];  // per device: 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const int known = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (known) return known == 2;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool has = major == 9 && minor == 0;  // sm_90a code runs on exactly 9.0
  if (device < 64) cache[device].store(has ? 2 : 1, std::memory_order_relaxed);
  return has;
}

int FluteTileBlocksPerSm(int bits, bool bf16, int m_tile, int column_n) {
  // Cached per instance (the GPUs of one process are alike); 0 = not yet known.
  static std::atomic<int> cache[3][2][3][2];
  std::atomic<int>& slot = cache[bits - 2][bf16][m_tile == 32 ? 0 : m_tile == 64 ? 1 : 2][column_n == 256 ? 1 : 0];
  const int known = slot.load(std::memory_order_relaxed);
  if (known > 0) return known;
  int blocks = 0;
  const cudaError_t status = WithTileKernel(bits, bf16, m_tile, column_n, [&](auto kernel, int smem) {
    cudaError_t s = Prepare(kernel, smem);
    if (s != cudaSuccess) return s;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, flute::kTileThreads, smem);
  });
  if (status != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls are unaffected
    return 0;
  }
  slot.store(blocks, std::memory_order_relaxed);
  return blocks;
}

cudaError_t EncodeTileXMap(CUtensorMap* map, const void* x, int64_t m, int64_t k, int m_tile, bool bf16) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr int kElementBytes = 2;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(m)};  // innermost first
  const cuuint64_t row_pitch[1] = {static_cast<cuuint64_t>(k) * kElementBytes};       // bytes, a multiple of 16
  const cuuint32_t box[2] = {flute::kAtomK, static_cast<cuuint32_t>(m_tile)};           // 128 bytes x the tile
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            const_cast<void*>(x), dims, row_pitch, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t LaunchFluteTile(cudaStream_t stream, int bits, bool bf16, int m_tile, int column_n, int grid,
                            int counters, bool counters_zero, const flute::Params& p, const CUtensorMap& x_map) {
  return WithTileKernel(bits, bf16, m_tile, column_n, [&](auto kernel, int smem) {
    const cudaError_t s = Prepare(kernel, smem);
    if (s != cudaSuccess) return s;
    return LaunchWithCounters(kernel, grid, flute::kTileThreads, smem, stream, counters, counters_zero, p, x_map);
  });
}

#ifdef FLUTE_JAX_TIMELINE
// tools/timeline.cu: the probe's stamps are per translation unit (flute_common.cuh), and
// the tile kernel's are this file's; copies them to (or, to_device, from) the host.
cudaError_t TileTimelineCopy(void* host, size_t bytes, bool to_device) {
  return to_device ? cudaMemcpyToSymbol(flute::g_timeline, host, bytes)
                   : cudaMemcpyFromSymbol(host, flute::g_timeline, bytes);
}
#endif

}  // namespace flute_jax

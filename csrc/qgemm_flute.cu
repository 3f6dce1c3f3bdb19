// Instantiations and launcher of the FLUTE kernel (see qgemm_flute.cuh).
// Templates: bits {2, 3, 4} x dtype {f16, bf16} x m-blocks {1, 2, 4}; group size
// is a run-time argument.
#include <cuda_runtime.h>

#include <climits>

#include "qgemm_flute.cuh"
#include "qgemm_flute.h"

namespace flute_jax {
namespace {

template <int kBits, typename T, int kMBlocks>
cudaError_t LaunchOne(cudaStream_t stream, const flute::Params& p) {
  constexpr int smem = flute::Smem<kBits, kMBlocks>::kTotal;
  auto kernel = flute::FluteQgemmKernel<kBits, T, kMBlocks>;
  // Raise the dynamic shared-memory limit once per instantiation (not a stream op).
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr_status != cudaSuccess) return attr_status;
  kernel<<<p.grid, flute::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int kBits, typename T>
cudaError_t LaunchBits(cudaStream_t stream, int m_blocks, const flute::Params& p) {
  switch (m_blocks) {
    case 1: return LaunchOne<kBits, T, 1>(stream, p);
    case 2: return LaunchOne<kBits, T, 2>(stream, p);
    default: return LaunchOne<kBits, T, 4>(stream, p);
  }
}

template <typename T>
cudaError_t LaunchTyped(cudaStream_t stream, int bits, int m_blocks, const flute::Params& p) {
  switch (bits) {
    case 2: return LaunchBits<2, T>(stream, m_blocks, p);
    case 3: return LaunchBits<3, T>(stream, m_blocks, p);
    default: return LaunchBits<4, T>(stream, m_blocks, p);
  }
}

}  // namespace

int CudaSmCount() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return 0;
  }
  return count;
}

cudaError_t LaunchQgemmFlute(cudaStream_t stream, bool bf16, const void* x, const uint32_t* codes,
                             const void* scales, const void* table, void* y, void* workspace,
                             int64_t workspace_bytes, const QgemmDims& d, const FlutePlan& plan_in) {
  FlutePlan plan = plan_in;
  // Fewer blocks if the workspace XLA gave is smaller than planned (still correct).
  const int64_t slot_bytes = int64_t{plan.rows_per_launch} * kFluteColumnN * 4;
  const int64_t counter_bytes = int64_t{plan.columns} * 4;
  const int64_t fit = (workspace_bytes - counter_bytes) / (2 * slot_bytes);
  if (fit < 1) return cudaErrorInvalidValue;
  plan.grid = static_cast<int>(std::min<int64_t>(plan.grid, fit));
  flute::Params p;
  p.codes = codes;
  p.scales = scales;
  p.table = table;
  p.partials = static_cast<float*>(workspace);
  p.counters = reinterpret_cast<int*>(static_cast<char*>(workspace) + 2 * int64_t{plan.grid} * slot_bytes);
  p.k = static_cast<int>(d.k);
  p.n = static_cast<int>(d.n);
  p.n_blocks = static_cast<int>(d.n_blocks);
  p.k_units = plan.k_units;
  p.columns = plan.columns;
  p.groups = static_cast<int>(d.groups);
  p.group_rows = static_cast<int>(d.group_rows);
  p.group_tiles = d.groups == 1 ? INT_MAX / 2 : static_cast<int>(d.group_rows / 16);
  p.grid = plan.grid;
  const int elem = 2;
  for (int64_t m0 = 0; m0 < d.m; m0 += plan.rows_per_launch) {
    p.m = static_cast<int>(std::min<int64_t>(plan.rows_per_launch, d.m - m0));
    p.x = static_cast<const char*>(x) + m0 * d.k * elem;
    p.y = static_cast<char*>(y) + m0 * d.n * elem;
    cudaError_t status = cudaMemsetAsync(p.counters, 0, counter_bytes, stream);
    if (status != cudaSuccess) return status;
    status = bf16 ? LaunchTyped<__nv_bfloat16>(stream, static_cast<int>(d.bits), plan.m_blocks, p)
                  : LaunchTyped<__half>(stream, static_cast<int>(d.bits), plan.m_blocks, p);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace flute_jax

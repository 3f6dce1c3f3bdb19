// One-time kernel attribute setup per device.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <tuple>

namespace flute_jax {

// Sets `kernel`'s dynamic shared-memory limit to `smem` bytes (and, when asked,
// the carveout to all of L1 as shared memory) on the current device, once per
// (device, kernel). Function attributes belong to a device, so a process-wide
// flag would be wrong with several GPUs; setting them before every launch cost
// host time on each of the hundreds of launches of a decode step. A host call,
// not a stream operation: safe during CUDA graph capture.
inline cudaError_t SetKernelAttributesOnce(const void* kernel, int smem, bool max_shared_carveout) {
  static std::mutex mutex;
  static std::set<std::tuple<int, const void*>> done;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count({device, kernel})) return cudaSuccess;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (status == cudaSuccess && max_shared_carveout)
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (status == cudaSuccess) done.insert({device, kernel});
  return status;
}

}  // namespace flute_jax

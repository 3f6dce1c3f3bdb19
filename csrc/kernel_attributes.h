// Host-side launch helpers: one-time kernel attributes per device, the binary
// version of a kernel, and launches as programmatic dependents (sm_90).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
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

// The compute capability (e.g. 90) of the binary of `kernel` that runs on the
// current device, once per (device, kernel); 0 when it cannot be read. A kernel
// may be launched as a programmatic dependent only where this is >= 90: code for
// earlier architectures compiles the grid-dependency wait to nothing.
inline int KernelBinaryVersion(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*>, int> known;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find({device, kernel});
  if (it != known.end()) return it->second;
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  known[{device, kernel}] = attributes.binaryVersion;
  return attributes.binaryVersion;
}

// Whether FLUTE kernels may start as programmatic dependents of the kernel that
// zeroes their counters (sm_90 code only); FLUTE_JAX_NO_PDL=1 in the environment
// turns it off (a memset before a plain launch), for comparisons and as an escape hatch.
inline bool DependentLaunchAllowed() {
  static const bool allowed = [] {
    const char* off = std::getenv("FLUTE_JAX_NO_PDL");
    return off == nullptr || off[0] == '\0' || off[0] == '0';
  }();
  return allowed;
}

// Whether FLUTE kernels on the call site's counters start as programmatic dependents
// of the stream's previous kernel (waiting for it before any operand is read);
// FLUTE_JAX_PDL_PRIOR=0 turns it off, for comparisons.
inline bool DependentOnPriorAllowed() {
  static const bool allowed = [] {
    const char* off = std::getenv("FLUTE_JAX_PDL_PRIOR");
    return off == nullptr || off[0] != '0';
  }();
  return allowed;
}

// Launches `kernel(params, extra...)`; with `dependent`, as a programmatic dependent
// of the stream's previous kernel (it may start before that kernel ends, and waits
// for it in GridDependencyWait, ptx.cuh). Capture-safe: inside a CUDA graph the
// dependency becomes a programmatic edge.
template <typename Params, typename... Extra>
cudaError_t LaunchKernel(void (*kernel)(Params, Extra...), int grid, int threads, int smem, cudaStream_t stream,
                         bool dependent, const Params& params, const Extra&... extra) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params, extra...);
}

}  // namespace flute_jax

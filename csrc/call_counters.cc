// Stream-K counters of one qgemm call site (see call_counters.h).
#include "call_counters.h"

#include <cstdlib>
#include <cstring>

namespace flute_jax {

xla::ffi::TypeId CallCounters::id = {};

CallCounters::~CallCounters() {
  int current = 0;
  const bool restore = cudaGetDevice(&current) == cudaSuccess;
  for (auto& [device, buffer] : buffers_) {
    if (cudaSetDevice(device) == cudaSuccess) cudaFree(buffer.data);
  }
  if (restore) cudaSetDevice(current);
  cudaGetLastError();  // a failure here must not surface in a later, unrelated call
}

int* CallCounters::Find(int device, int64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = buffers_.find(device);
  return it != buffers_.end() && it->second.count >= count ? it->second.data : nullptr;
}

cudaError_t CallCounters::Reserve(int device, int64_t count, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  Buffer& buffer = buffers_[device];
  if (buffer.count >= count) return cudaSuccess;
  // A call site's shapes are static, so this grows at most once per device in
  // practice. The old buffer is idle: the stream runs this call site in order.
  // The allocation goes to `device` whichever device this thread had current.
  int previous = device;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = device;
  cudaError_t status = previous == device ? cudaSuccess : cudaSetDevice(device);
  int* data = nullptr;
  if (status == cudaSuccess) status = cudaMalloc(&data, count * sizeof(int));
  if (status == cudaSuccess) status = cudaMemsetAsync(data, 0, count * sizeof(int), stream);
  if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
  if (previous != device) cudaSetDevice(previous);
  if (status != cudaSuccess) {
    if (data != nullptr) cudaFree(data);
    return status;
  }
  if (buffer.data != nullptr) cudaFree(buffer.data);
  buffer.data = data;
  buffer.count = count;
  return cudaSuccess;
}

bool CallCountersEnabled() {
  static const bool enabled = [] {
    const char* mode = std::getenv("FLUTE_JAX_COUNTERS");
    return mode == nullptr || std::strcmp(mode, "workspace") != 0;
  }();
  return enabled;
}

const XLA_FFI_TypeInfo* CallCountersTypeInfo() {
  static const XLA_FFI_TypeInfo info = xla::ffi::MakeTypeInfo<CallCounters>();
  return &info;
}

}  // namespace flute_jax

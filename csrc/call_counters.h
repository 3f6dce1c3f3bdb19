// Stream-K counters that belong to one qgemm call site (its FFI state).
//
// Each split column of a FLUTE launch needs an arrival counter that starts at
// zero. In XLA's per-call workspace that costs a zeroing kernel before every
// launch: ~0.9 us per call between the events around it (H200, tools/timeline.cu,
// 2026-11-30). Instead, the block that completes a split column sets its counter
// back to zero, so counters that outlive the launch are zero again at its end, and
// the next launch needs no zeroing.
//
// Such counters must never be shared by two kernels that can run at once. XLA may
// run independent commands of a command buffer concurrently, so they belong to one
// call site: the FFI instantiate state of the qgemm custom call, one buffer per
// device. One call site runs its launches in order on its stream. The buffer is
// allocated and zeroed in the FFI initialize stage, which runs before execution
// and outside CUDA graph capture; where it is missing (or too small) the handler
// falls back to the workspace and the zeroing kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace flute_jax {

class CallCounters {
 public:
  static xla::ffi::TypeId id;  // registered with XLA by flute_jax/_ffi.py

  CallCounters() = default;
  CallCounters(const CallCounters&) = delete;
  CallCounters& operator=(const CallCounters&) = delete;
  ~CallCounters();

  // This call site's `count` zeroed counters on `device`, or nullptr when they
  // were not reserved (then the caller zeroes workspace counters itself).
  int* Find(int device, int64_t count);

  // Allocates and zeroes `count` counters on `device` (made current for the
  // allocation) unless there are enough; waits for the zeroing on `stream`, a
  // stream of that device. Not for use under capture.
  cudaError_t Reserve(int device, int64_t count, cudaStream_t stream);

 private:
  struct Buffer {
    int* data = nullptr;
    int64_t count = 0;
  };
  std::mutex mutex_;
  std::map<int, Buffer> buffers_;  // by device ordinal
};

// Whether qgemm calls use their call site's counters (default), or zero workspace
// counters before each launch (FLUTE_JAX_COUNTERS=workspace, for comparisons).
bool CallCountersEnabled();

// The type registration for flute_jax/_ffi.py (jax.ffi.register_ffi_type).
const XLA_FFI_TypeInfo* CallCountersTypeInfo();

}  // namespace flute_jax

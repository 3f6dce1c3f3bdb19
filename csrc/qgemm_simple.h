#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qgemm_args.h"

namespace flute_jax {

// Launches the simple kernel on `stream`; returns the launch error, if any.
template <typename T>
cudaError_t LaunchQgemmSimple(cudaStream_t stream, const T* x, const uint32_t* codes,
                              const T* scales, const T* table, T* y, const QgemmDims& d);

}  // namespace flute_jax

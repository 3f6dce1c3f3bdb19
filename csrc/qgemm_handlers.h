// The FFI handler symbols the nanobind module hands to JAX.
#pragma once

#include "xla/ffi/api/c_api.h"

namespace flute_jax {
extern "C" XLA_FFI_Error* QgemmCpu(XLA_FFI_CallFrame* call_frame);
#ifdef FLUTE_JAX_WITH_CUDA
extern "C" XLA_FFI_Error* QgemmCudaInstantiate(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* QgemmCudaInitialize(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* QgemmCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* DequantCuda(XLA_FFI_CallFrame* call_frame);
#endif
}  // namespace flute_jax

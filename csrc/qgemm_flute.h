#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qgemm_args.h"
#include "qgemm_plan.h"

namespace flute_jax {

// The plan for a call on the current device (FlutePlan::fast false: simple kernel).
FlutePlan MakeFlutePlan(int64_t m, int64_t k, int64_t n, int64_t group_rows, int bits, bool is_half_type,
                        bool bf16);

// Runs the FLUTE kernel for a plan with plan.fast; x/scales/table/y are f16 or bf16.
cudaError_t LaunchQgemmFlute(cudaStream_t stream, bool bf16, const void* x, const uint32_t* codes,
                             const void* scales, const void* table, void* y, void* workspace,
                             int64_t workspace_bytes, const QgemmDims& d, const FlutePlan& plan);

}  // namespace flute_jax

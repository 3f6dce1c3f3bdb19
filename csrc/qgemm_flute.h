#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qgemm_args.h"
#include "qgemm_plan.h"

namespace flute_jax {

// The plan for a call on the current device (FlutePlan::fast false: simple kernel).
// want_wgmma asks for the tile kernel, which the plan takes where the device runs
// sm_90a code (else the decode kernel).
FlutePlan MakeFlutePlan(int64_t m, int64_t k, int64_t n, int64_t group_rows, int bits, bool is_half_type,
                        bool bf16, bool want_wgmma);

// Whether the current device runs the sm_90a tile kernel (compute capability 9.0).
bool DeviceHasWgmma();

// Runs the FLUTE kernel for a plan with plan.fast; x/scales/table/y are f16 or bf16,
// the workspace holds at least plan.workspace_bytes. `call_counters`: the call
// site's FluteCounterCount(plan) zeroed Stream-K counters (call_counters.h), or
// nullptr to zero the workspace's counters before each launch.
cudaError_t LaunchQgemmFlute(cudaStream_t stream, bool bf16, const void* x, const uint32_t* codes,
                             const void* scales, const void* table, void* y, void* workspace, int* call_counters,
                             const QgemmDims& d, const FlutePlan& plan);

}  // namespace flute_jax

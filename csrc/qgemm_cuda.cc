// CUDA qgemm FFI handlers: checks arguments, picks a kernel (qgemm_plan.h),
// reports launch errors through the FFI error return. Three stages:
//  - instantiate: the call site's state, its Stream-K counters (call_counters.h);
//  - initialize (before execution, outside CUDA graph capture): allocates and
//    zeroes those counters on the device, once;
//  - execute: no allocation and no host sync (the Stream-K partial sums live in a
//    second result buffer that XLA allocates), so it is safe inside CUDA graphs
//    (registered command-buffer compatible).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "call_counters.h"
#include "qgemm_args.h"
#include "qgemm_flute.h"
#include "qgemm_handlers.h"
#include "qgemm_simple.h"

namespace flute_jax {
namespace {

template <typename T>
cudaError_t Launch(cudaStream_t stream, const ffi::AnyBuffer& x, const ffi::Buffer<ffi::U32>& codes,
                   const ffi::AnyBuffer& scales, const ffi::AnyBuffer& table, ffi::AnyBuffer& y,
                   const QgemmDims& d) {
  return LaunchQgemmSimple<T>(stream, reinterpret_cast<const T*>(x.untyped_data()),
                              codes.typed_data(), reinterpret_cast<const T*>(scales.untyped_data()),
                              reinterpret_cast<const T*>(table.untyped_data()),
                              reinterpret_cast<T*>(y.untyped_data()), d);
}

// The checked dimensions of a call and the plan of its CUDA kernel.
ffi::Error PlanCall(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::U32>& codes, const ffi::AnyBuffer& scales,
                    const ffi::AnyBuffer& table, const ffi::AnyBuffer& y, int64_t bits, int64_t group_size,
                    int64_t kernel, int64_t epilogue, QgemmDims* d, FlutePlan* plan) {
  if (ffi::Error err = CheckQgemmArgs(x, codes, scales, table, y, bits, group_size, epilogue, d); err.failure())
    return err;
  if (kernel != 0 && kernel != 1)
    return ffi::Error::InvalidArgument("flute_qgemm: kernel must be 0 (decode) or 1 (tile), got " +
                                       std::to_string(kernel));
  if (d->m == 0) return ffi::Error::Success();
  const auto type = x.element_type();
  *plan = MakeFlutePlan(d->m, d->k, d->n, d->group_rows, d->bits, type != ffi::DataType::F32,
                        type == ffi::DataType::BF16, kernel == 1);
  return ffi::Error::Success();
}

ffi::ErrorOr<std::unique_ptr<CallCounters>> QgemmCudaInstantiateImpl(int64_t, int64_t, int64_t, int64_t) {
  return std::make_unique<CallCounters>();
}

ffi::Error QgemmCudaInitializeImpl(cudaStream_t stream, int32_t device, CallCounters* counters, ffi::AnyBuffer x,
                                   ffi::Buffer<ffi::U32> codes, ffi::AnyBuffer scales, ffi::AnyBuffer table,
                                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::U8>>, int64_t bits,
                                   int64_t group_size, int64_t kernel, int64_t epilogue) {
  QgemmDims d;
  FlutePlan plan;
  if (ffi::Error err = PlanCall(x, codes, scales, table, *y, bits, group_size, kernel, epilogue, &d, &plan);
      err.failure())
    return err;
  if (d.m == 0 || !plan.fast || !CallCountersEnabled()) return ffi::Error::Success();
  const cudaError_t status = counters->Reserve(device, FluteCounterCount(plan), stream);
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("flute_qgemm: allocating the call's Stream-K counters failed: ") +
                                cudaGetErrorString(status));
  return ffi::Error::Success();
}

ffi::Error QgemmCudaImpl(cudaStream_t stream, int32_t device, CallCounters* counters, ffi::AnyBuffer x,
                         ffi::Buffer<ffi::U32> codes, ffi::AnyBuffer scales, ffi::AnyBuffer table,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                         int64_t bits, int64_t group_size, int64_t kernel, int64_t epilogue) {
  QgemmDims d;
  FlutePlan plan;
  if (ffi::Error err = PlanCall(x, codes, scales, table, *y, bits, group_size, kernel, epilogue, &d, &plan);
      err.failure())
    return err;
  if (d.m == 0) return ffi::Error::Success();
  const auto type = x.element_type();
  cudaError_t status;
  if (plan.fast && static_cast<int64_t>(workspace->size_bytes()) >= plan.workspace_bytes) {
    // The call site's counters when the initialize stage reserved them, else the workspace's.
    int* call_counters = CallCountersEnabled() ? counters->Find(device, FluteCounterCount(plan)) : nullptr;
    status = LaunchQgemmFlute(stream, type == ffi::DataType::BF16, x.untyped_data(), codes.typed_data(),
                              scales.untyped_data(), table.untyped_data(), y->untyped_data(),
                              workspace->untyped_data(), call_counters, d, plan);
    if (status != cudaSuccess)
      return ffi::Error::Internal(std::string("flute_qgemm: CUDA launch failed: ") +
                                  cudaGetErrorString(status));
    return ffi::Error::Success();
  }
  switch (x.element_type()) {
    case ffi::DataType::F32: status = Launch<float>(stream, x, codes, scales, table, *y, d); break;
    case ffi::DataType::BF16:
      status = Launch<__nv_bfloat16>(stream, x, codes, scales, table, *y, d);
      break;
    case ffi::DataType::F16: status = Launch<__half>(stream, x, codes, scales, table, *y, d); break;
    default: return ffi::Error::InvalidArgument("flute_qgemm: unsupported dtype");
  }
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("flute_qgemm: CUDA launch failed: ") +
                                cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QgemmCudaInstantiate, QgemmCudaInstantiateImpl,
                              ffi::Ffi::BindInstantiate()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("epilogue"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QgemmCudaInitialize, QgemmCudaInitializeImpl,
                              ffi::Ffi::BindInitialize()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::State<CallCounters>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kernel")
                                  .Attr<int64_t>("epilogue"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QgemmCuda, QgemmCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::State<CallCounters>>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // packed codes
                                  .Arg<ffi::AnyBuffer>()         // scales [G, N]
                                  .Arg<ffi::AnyBuffer>()         // table [2**bits]
                                  .Ret<ffi::AnyBuffer>()         // y [M, N] (swiglu: [M, N/2])
                                  .Ret<ffi::Buffer<ffi::U8>>()   // Stream-K workspace
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("kernel")       // 0 decode (mma.sync), 1 tile (wgmma)
                                  .Attr<int64_t>("epilogue"),    // epilogue.h
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace flute_jax

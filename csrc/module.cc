// nanobind module: hands the FFI handlers to Python as PyCapsules, which
// flute_jax/_ffi.py registers with jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "qgemm_handlers.h"
#include "qgemm_plan.h"
#ifdef FLUTE_JAX_WITH_CUDA
#include "call_counters.h"
#include "qgemm_flute.h"
#endif

namespace nb = nanobind;

namespace {
template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_flute_ffi, m) {
  m.def("cpu_targets", []() {
    nb::dict targets;
    targets["flute_qgemm"] = Capsule(flute_jax::QgemmCpu);
    return targets;
  });
  m.def("cuda_targets", []() {
    nb::dict targets;
#ifdef FLUTE_JAX_WITH_CUDA
    nb::dict qgemm;  // the stages of a handler with state (the call site's Stream-K counters)
    qgemm["instantiate"] = Capsule(flute_jax::QgemmCudaInstantiate);
    qgemm["initialize"] = Capsule(flute_jax::QgemmCudaInitialize);
    qgemm["execute"] = Capsule(flute_jax::QgemmCuda);
    targets["flute_qgemm"] = qgemm;
    targets["flute_dequantize"] = Capsule(flute_jax::DequantCuda);
#endif
    return targets;
  });
  // The FFI state types of the CUDA handlers, for jax.ffi.register_ffi_type.
  m.def("cuda_types", []() {
    nb::dict types;
#ifdef FLUTE_JAX_WITH_CUDA
    nb::dict counters;
    counters["type_id"] = nb::capsule(reinterpret_cast<void*>(&flute_jax::CallCounters::id));
    counters["type_info"] = nb::capsule(const_cast<void*>(static_cast<const void*>(flute_jax::CallCountersTypeInfo())));
    types["flute_jax.call_counters"] = counters;
#endif
    return types;
  });
  // The CUDA handler's plan for a call, for the lowering's workspace size and for tests.
  m.def("cuda_plan", [](int64_t m_rows, int64_t k, int64_t n, int64_t group_rows, int bits,
                        std::string dtype, bool want_wgmma) {
    flute_jax::FlutePlan plan;
#ifdef FLUTE_JAX_WITH_CUDA
    plan = flute_jax::MakeFlutePlan(m_rows, k, n, group_rows, bits, dtype != "float32", dtype == "bfloat16",
                                    want_wgmma);
#endif
    nb::dict out;
    out["kernel"] = !plan.fast ? "simple" : plan.wgmma ? "flute_wgmma" : "flute";
    out["grid"] = plan.grid;
    out["column_n"] = plan.column_n;
    out["rows_per_launch"] = plan.rows_per_launch;  // decode: rows per launch; tile kernel: rows per x tile
    out["row_tiles"] = plan.row_tiles;
    out["workspace_bytes"] = plan.workspace_bytes;
    return out;
  });
  // Whether the current GPU runs the wgmma tile kernel (compute capability 9.0).
  m.def("cuda_has_wgmma", []() {
#ifdef FLUTE_JAX_WITH_CUDA
    return flute_jax::DeviceHasWgmma();
#else
    return false;
#endif
  });
#ifdef FLUTE_JAX_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

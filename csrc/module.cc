// nanobind module: hands the FFI handlers to Python as PyCapsules, which
// flute_jax/_ffi.py registers with jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>

#include "qgemm_handlers.h"

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
    targets["flute_qgemm"] = Capsule(flute_jax::QgemmCuda);
#endif
    return targets;
  });
#ifdef FLUTE_JAX_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

// CPU qgemm: y[m, n] = sum_k x[m, k] * table[code(k, n)] * scales[k / group_rows, n]
// (with the swiglu epilogue, silu(y[m, gate]) * y[m, up] per pair: epilogue.h).
// The reference the GPU kernels are tested against computes the same function;
// this one is threaded over N-blocks. Each output element is summed by one
// thread in ascending k with float32 accumulation, so results are bitwise
// deterministic whatever the thread count.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "host_float.h"
#include "layout.h"
#include "qgemm_args.h"
#include "qgemm_handlers.h"

namespace flute_jax {
namespace {

template <typename T>
void QgemmNBlocks(const T* x, const uint32_t* codes, const T* scales, const T* table,
                  T* y, const QgemmDims& d, int64_t nb_begin, int64_t nb_end) {
  float table_f[16];
  for (int i = 0; i < (1 << d.bits); ++i) table_f[i] = ToFloat(table[i]);
  std::vector<float> w(static_cast<size_t>(d.k) * kBlockN);  // dequantized [K, 16] slab
  float acc[kBlockN];
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * kBlockN;
    const int cols = static_cast<int>(std::min<int64_t>(kBlockN, d.n - n0));
    for (int64_t k = 0; k < d.k; ++k) {
      const T* scale_row = scales + (k / d.group_rows) * d.n + n0;
      const uint32_t* unit = codes + ((k / kBlockK) * d.n_blocks + nb) * WordsPerUnit(d.bits);
      for (int j = 0; j < kBlockN; ++j) {
        w[k * kBlockN + j] =
            j < cols ? table_f[CodeInUnit(unit, d.bits, static_cast<int>(k % kBlockK), j)] *
                           ToFloat(scale_row[j])
                     : 0.0f;
      }
    }
    for (int64_t m = 0; m < d.m; ++m) {
      std::fill(acc, acc + kBlockN, 0.0f);
      const T* xrow = x + m * d.k;
      for (int64_t k = 0; k < d.k; ++k) {
        const float xv = ToFloat(xrow[k]);
        const float* wk = &w[k * kBlockN];
        for (int j = 0; j < kBlockN; ++j) acc[j] += xv * wk[j];
      }
      if (d.epilogue == kEpilogueSwiglu) {  // N % 16 == 0: the block's 8 gates, then their 8 ups
        for (int j = 0; j < kBlockN / 2; ++j)
          y[m * (d.n / 2) + SwigluColumn(n0 + j)] = FromFloat<T>(Swiglu(acc[j], acc[j + kBlockN / 2]));
      } else {
        for (int j = 0; j < cols; ++j) y[m * d.n + n0 + j] = FromFloat<T>(acc[j]);
      }
    }
  }
}

template <typename T>
void QgemmThreaded(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::U32>& codes,
                   const ffi::AnyBuffer& scales, const ffi::AnyBuffer& table,
                   ffi::AnyBuffer& y, const QgemmDims& d) {
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const T* sp = reinterpret_cast<const T*>(scales.untyped_data());
  const T* tp = reinterpret_cast<const T*>(table.untyped_data());
  T* yp = reinterpret_cast<T*>(y.untyped_data());
  const uint32_t* cp = codes.typed_data();
  // One thread per ~1M multiply-adds of work, at most one per core and per N-block.
  const int64_t work = (d.m + 1) * d.k * d.n;
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::max<int64_t>(1, std::min({hw, d.n_blocks, work / (1 << 20) + 1}));
  if (threads == 1) {
    QgemmNBlocks<T>(xp, cp, sp, tp, yp, d, 0, d.n_blocks);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = d.n_blocks * t / threads, end = d.n_blocks * (t + 1) / threads;
    pool.emplace_back(QgemmNBlocks<T>, xp, cp, sp, tp, yp, std::cref(d), begin, end);
  }
  for (auto& th : pool) th.join();
}

ffi::Error QgemmCpuImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes, ffi::AnyBuffer scales,
                        ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> y, int64_t bits,
                        int64_t group_size, int64_t epilogue) {
  QgemmDims d;
  if (ffi::Error err = CheckQgemmArgs(x, codes, scales, table, *y, bits, group_size, epilogue, &d);
      err.failure())
    return err;
  if (d.m == 0) return ffi::Error::Success();
  switch (x.element_type()) {
    case ffi::DataType::F32: QgemmThreaded<float>(x, codes, scales, table, *y, d); break;
    case ffi::DataType::BF16: QgemmThreaded<BFloat16>(x, codes, scales, table, *y, d); break;
    case ffi::DataType::F16: QgemmThreaded<Half>(x, codes, scales, table, *y, d); break;
    default: return ffi::Error::InvalidArgument("flute_qgemm: unsupported dtype");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QgemmCpu, QgemmCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()       // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // packed codes
                                  .Arg<ffi::AnyBuffer>()       // scales [G, N]
                                  .Arg<ffi::AnyBuffer>()       // table [2**bits]
                                  .Ret<ffi::AnyBuffer>()       // y [M, N] (swiglu: [M, N/2])
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("epilogue"));   // epilogue.h

}  // namespace flute_jax

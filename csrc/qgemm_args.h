// Argument checks shared by the CPU and CUDA qgemm handlers. Python validates
// everything at trace time; this re-check turns any mismatch that slips through
// (a hand-built custom call, a bad sharding) into an FFI error, never a crash.
#pragma once

#include <cstdint>
#include <string>

#include "epilogue.h"
#include "layout.h"
#include "xla/ffi/api/ffi.h"

namespace flute_jax {

namespace ffi = xla::ffi;

struct QgemmDims {
  int64_t m, k, n;     // y[m, n] = x[m, k] @ W_hat[k, n]
  int64_t n_blocks;    // N-blocks of the packed codes
  int64_t groups;      // rows of scales
  int64_t group_rows;  // K rows per scale group
  int bits;
  int epilogue = kEpilogueNone;  // Epilogue (epilogue.h); y has OutputColumns(n, epilogue) columns
};

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline bool IsActivationType(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 || t == ffi::DataType::F32;
}

// Checks ranks, sizes and dtypes; fills `dims` on success.
inline ffi::Error CheckQgemmArgs(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::U32>& codes,
                                 const ffi::AnyBuffer& scales, const ffi::AnyBuffer& table,
                                 const ffi::AnyBuffer& y, int64_t bits, int64_t group_rows,
                                 int64_t epilogue, QgemmDims* dims) {
  auto fail = [](const std::string& msg) { return ffi::Error::InvalidArgument("flute_qgemm: " + msg); };
  if (bits < 2 || bits > 4) return fail("bits must be 2, 3 or 4, got " + std::to_string(bits));
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions(),
       td = table.dimensions(), yd = y.dimensions();
  if (xd.size() != 2) return fail("x must be rank 2 [M, K], got " + DimsToString(xd));
  if (cd.size() != 3) return fail("codes must be rank 3, got " + DimsToString(cd));
  if (sd.size() != 2) return fail("scales must be rank 2 [G, N], got " + DimsToString(sd));
  if (td.size() != 1 || td[0] != (int64_t{1} << bits))
    return fail("table must be [2**bits], got " + DimsToString(td));
  if (epilogue != kEpilogueNone && epilogue != kEpilogueSwiglu)
    return fail("epilogue must be 0 (none) or 1 (swiglu), got " + std::to_string(epilogue));
  const int64_t m = xd[0], k = xd[1], n = sd[1];
  if (epilogue == kEpilogueSwiglu && n % 16 != 0)
    return fail("the swiglu epilogue needs N a multiple of 16 (gate/up pairs per 16-column block), got N=" +
                std::to_string(n));
  const int64_t y_cols = OutputColumns(n, static_cast<int>(epilogue));
  if (yd.size() != 2 || yd[0] != m || yd[1] != y_cols)
    return fail("y must be [M, " + std::string(epilogue ? "N/2" : "N") + "] = [" + std::to_string(m) + ", " +
                std::to_string(y_cols) + "], got " + DimsToString(yd));
  if (k < 1 || n < 1) return fail("K and N must be >= 1");
  const int64_t kb = (k + kBlockK - 1) / kBlockK, nb = (n + kBlockN - 1) / kBlockN;
  if (cd[0] != kb || cd[1] != nb || cd[2] != WordsPerUnit(static_cast<int>(bits)))
    return fail("codes must be [" + std::to_string(kb) + ", " + std::to_string(nb) + ", " +
                std::to_string(WordsPerUnit(static_cast<int>(bits))) + "] for K=" +
                std::to_string(k) + ", N=" + std::to_string(n) + ", got " + DimsToString(cd));
  if (group_rows < 1) return fail("group_size must be >= 1");
  const int64_t groups = (k + group_rows - 1) / group_rows;
  if (sd[0] != groups)
    return fail("scales must have " + std::to_string(groups) + " rows, got " + DimsToString(sd));
  const auto t = x.element_type();
  if (!IsActivationType(t)) return fail("x must be float16, bfloat16 or float32");
  if (scales.element_type() != t || table.element_type() != t || y.element_type() != t)
    return fail("scales, table and y must have x's dtype");
  *dims = QgemmDims{m, k, n, nb, groups, group_rows, static_cast<int>(bits), static_cast<int>(epilogue)};
  return ffi::Error::Success();
}

}  // namespace flute_jax

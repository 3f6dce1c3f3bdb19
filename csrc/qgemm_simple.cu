// A simple, correct CUDA qgemm for every dtype, bits and shape: each block
// dequantizes a [64 x 64] tile of W into shared memory as float32 and multiplies
// it with a [16 x 64] tile of x, accumulating in float32 in ascending k. It is
// the fallback for shapes and dtypes the fast kernel does not take (float32
// activations) and the GPU reference the fast kernel is checked against. A thread's
// columns pair up as (gate, up) of the swiglu epilogue (epilogue.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_types.cuh"
#include "epilogue.h"
#include "layout.h"
#include "qgemm_simple.h"

namespace flute_jax {
namespace {

constexpr int kTileM = 16, kTileN = 64, kTileK = 64, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    QgemmSimpleKernel(const T* __restrict__ x, const uint32_t* __restrict__ codes,
                      const T* __restrict__ scales, const T* __restrict__ table,
                      T* __restrict__ y, int64_t m_total, int64_t k_total, int64_t n_total,
                      int64_t n_blocks, int64_t group_rows, int bits, int epilogue) {
  __shared__ float x_tile[kTileM][kTileK];
  __shared__ float w_tile[kTileK][kTileN + 1];
  __shared__ float table_f[16];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  if (tid < (1 << bits)) table_f[tid] = ToF32(table[tid]);
  // Each thread owns 4 outputs of row tid / 16: columns col[j] = base + 8 j for j < 2 and
  // base + 32 + 8 (j - 2) for j >= 2, base = (tid % 8) + 16 ((tid / 8) % 2): columns j and
  // j + 1 (j even) are 8 apart in one 16-column block, a gate/up pair of the swiglu epilogue.
  const int out_m = tid / 16, out_n = (tid % 8) + 16 * ((tid / 8) % 2);
  const int col[4] = {out_n, out_n + 8, out_n + 32, out_n + 40};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t k0 = 0; k0 < k_total; k0 += kTileK) {
    __syncthreads();  // previous tile fully consumed (and table_f written)
    for (int i = tid; i < kTileM * kTileK; i += kThreads) {
      const int mi = i / kTileK, ki = i % kTileK;
      const int64_t m = m0 + mi, k = k0 + ki;
      x_tile[mi][ki] = (m < m_total && k < k_total) ? ToF32(x[m * k_total + k]) : 0.f;
    }
    for (int i = tid; i < kTileK * kTileN; i += kThreads) {
      const int ki = i / kTileN, ni = i % kTileN;
      const int64_t k = k0 + ki, n = n0 + ni;
      float w = 0.f;
      if (k < k_total && n < n_total) {
        w = table_f[CodeAt(codes, n_blocks, bits, k, n)] * ToF32(scales[(k / group_rows) * n_total + n]);
      }
      w_tile[ki][ni] = w;
    }
    __syncthreads();
#pragma unroll 8
    for (int ki = 0; ki < kTileK; ++ki) {
      const float xv = x_tile[out_m][ki];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += xv * w_tile[ki][col[j]];
    }
  }
  const int64_t m = m0 + out_m;
  if (m >= m_total) return;
  if (epilogue == kEpilogueSwiglu) {  // N % 16 == 0
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      const int64_t n = n0 + col[j];
      if (n < n_total) y[m * (n_total / 2) + SwigluColumn(n)] = FromF32<T>(Swiglu(acc[j], acc[j + 1]));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + col[j];
    if (n < n_total) y[m * n_total + n] = FromF32<T>(acc[j]);
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchQgemmSimple(cudaStream_t stream, const T* x, const uint32_t* codes,
                              const T* scales, const T* table, T* y, const QgemmDims& d) {
  const dim3 grid(static_cast<unsigned>((d.n + kTileN - 1) / kTileN),
                  static_cast<unsigned>((d.m + kTileM - 1) / kTileM));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  QgemmSimpleKernel<T><<<grid, kThreads, 0, stream>>>(x, codes, scales, table, y, d.m, d.k, d.n,
                                                        d.n_blocks, d.group_rows, d.bits, d.epilogue);
  return cudaGetLastError();
}

template cudaError_t LaunchQgemmSimple<float>(cudaStream_t, const float*, const uint32_t*,
                                              const float*, const float*, float*, const QgemmDims&);
template cudaError_t LaunchQgemmSimple<__half>(cudaStream_t, const __half*, const uint32_t*,
                                               const __half*, const __half*, __half*,
                                               const QgemmDims&);
template cudaError_t LaunchQgemmSimple<__nv_bfloat16>(cudaStream_t, const __nv_bfloat16*,
                                                      const uint32_t*, const __nv_bfloat16*,
                                                      const __nv_bfloat16*, __nv_bfloat16*,
                                                      const QgemmDims&);

}  // namespace flute_jax

// Output epilogues of qgemm, shared by the CPU handler and the CUDA kernels.
//
// kEpilogueSwiglu: the weight's columns hold a gate/up pair per 16-column block (columns
// 16 b + i are gate i and 16 b + 8 + i are up i of output block b, i < 8;
// flute_jax.epilogue.interleave_gate_up writes this order), and y[m, 8 b + i] = silu(gate) * up, computed in
// float32 from the accumulators and rounded once. Eight is the distance between the two
// features a thread of the tensor-core kernels holds (mma accumulator rows r and r + 8), so
// both values of a pair meet in one thread with no exchange.
#pragma once

#include <cmath>

#include "layout.h"  // FJ_HD

namespace flute_jax {

enum Epilogue : int { kEpilogueNone = 0, kEpilogueSwiglu = 1 };

// Output columns of a call with N weight columns.
FJ_HD long long OutputColumns(long long n, int epilogue) { return epilogue == kEpilogueSwiglu ? n / 2 : n; }

// Output column of gate column n (n % 16 < 8) under kEpilogueSwiglu.
FJ_HD long long SwigluColumn(long long n) { return (n >> 4) * 8 + (n & 7); }

// silu(g) * u = g / (1 + e^-g) * u in float32; NaN and Inf propagate as in jax.nn.silu(g) * u
// (silu(-inf) = -inf / inf = NaN, as -inf * sigmoid(-inf) = -inf * 0).
FJ_HD float Swiglu(float g, float u) {
#if defined(__CUDA_ARCH__)
  return g / (1.0f + expf(-g)) * u;
#else
  return g / (1.0f + std::exp(-g)) * u;
#endif
}

}  // namespace flute_jax

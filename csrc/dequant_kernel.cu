// The dequantize kernel of the "dense" GPU path (large M): the packed codes ->
// W_hat [K, N] row-major in the activation dtype, at close to the copy bandwidth,
// for XLA's dot to multiply. Same values as the jnp reference
// (flute_jax.autodiff.dequantized(...).astype(T)): float32(table[code]) *
// float32(scale), rounded once to T.
//
// A block takes one K-block (256 k) x 8 N-blocks (128 features): eight units.
//  1. Its threads copy the units' code words into shared memory with 16-byte
//     loads (each unit's rows are padded by 4 words, see below), the scale rows
//     of the K-block as float32, and the table as float32.
//  2. Each thread then makes 2 rows (k, k + 1) x 8 features of W: the two codes
//     of one (k, k + 1) pair are adjacent bits of one word of the packed stream
//     (flute_jax/layout.py), so one shared-memory read per feature and plane
//     serves two rows. Its two 16-byte stores sit in rows that the warp writes
//     256 contiguous bytes of.
// Bank conflicts: a warp's 32 threads are 16 feature chunks (8 units x 2 halves)
// x 2 k-pairs 8 rows apart. The k-pairs then share the lane group q and differ
// only in the pair index, and the halves only in the pair index too: both read
// the same word (a broadcast). The 8 units differ, and the 4-word pad puts them
// in 8 different banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_types.cuh"
#include "layout.h"
#include "qgemm_args.h"
#include "qgemm_handlers.h"

namespace flute_jax {
namespace {

constexpr int kThreads = 256;
constexpr int kUnitsPerBlock = 8;               // N-blocks of a block: 128 features
constexpr int kBlockRows = kBlockK;             // 256 k
constexpr int kBlockCols = kBlockN * kUnitsPerBlock;
constexpr int kMaxGroupRows = kBlockRows / 32;  // scale rows of a K-block (groups >= 32 rows)
constexpr int kPadWords = 4;

struct DequantParams {
  const uint32_t* codes;
  const void* scales;  // [groups, N]
  const void* table;   // [2**bits]
  void* w;             // [K, N]
  int64_t k, n;
  int n_blocks, groups, group_shift;  // group of row k: k >> group_shift (30: a single group)
};

// The `2 * width` bits of the (k, k + 1) code pair of pair index p at k-tile t,
// for lane `lane` of a unit's plane of the given width (layout.py: bit s of the
// lane's stream, s = 8 w t + 2 w p + w kodd, sits at word 128 (s >> 7) + 4 lane +
// ((s >> 5) & 3), bit s & 31). Not the 3-bit code's high plane: HighPlanePair.
template <int kWidth>
__device__ __forceinline__ uint32_t PairBits(const uint32_t* plane, int lane, int t, int p) {
  const int s = 8 * kWidth * t + 2 * kWidth * p;
  return (plane[128 * (s >> 7) + 4 * lane + ((s >> 5) & 3)] >> (s & 31)) & ((1u << (2 * kWidth)) - 1);
}

// Eight features of one row, rounded to T, as 16-byte stores (dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void StoreChunk(T* dst, const float (&v)[8]) {
  union {
    T values[8];
    uint4 chunks[sizeof(T) / 2];
  } out;
#pragma unroll
  for (int e = 0; e < 8; ++e) out.values[e] = FromF32<T>(v[e]);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T)) / 2; ++i) reinterpret_cast<uint4*>(dst)[i] = out.chunks[i];
}

template <int kBits, typename T>
__global__ void __launch_bounds__(kThreads) DequantKernel(const DequantParams p) {
  constexpr int kUnitWords = 128 * kBits, kStride = kUnitWords + kPadWords;
  __shared__ __align__(16) uint32_t words[kUnitsPerBlock * kStride];
  __shared__ float scales[kMaxGroupRows][kBlockCols];
  __shared__ float table[1 << kBits];

  const int tid = threadIdx.x;
  const int kb = blockIdx.y, nb0 = blockIdx.x * kUnitsPerBlock;
  const int units = min(kUnitsPerBlock, p.n_blocks - nb0);
  const int64_t k0 = int64_t{kb} * kBlockRows;
  const int col0 = nb0 * kBlockN;

  // 1. Codes (contiguous in global memory: units [kb, nb0 .. nb0 + 7]), scales, table.
  const uint4* src = reinterpret_cast<const uint4*>(p.codes + (int64_t{kb} * p.n_blocks + nb0) * kUnitWords);
  for (int i = tid; i < units * (kUnitWords / 4); i += kThreads) {
    const int u = i / (kUnitWords / 4), j = i % (kUnitWords / 4);
    *reinterpret_cast<uint4*>(words + u * kStride + 4 * j) = __ldg(src + i);
  }
  const T* scale_src = static_cast<const T*>(p.scales);
  const int g_lo = static_cast<int>(k0 >> p.group_shift);
  const int g_rows = min(p.groups - 1, static_cast<int>(min(k0 + kBlockRows, p.k) - 1) >> p.group_shift) - g_lo + 1;
  for (int i = tid; i < g_rows * kBlockCols; i += kThreads) {
    const int row = i / kBlockCols, col = i % kBlockCols;
    scales[row][col] = col0 + col < p.n ? ToF32(scale_src[int64_t{g_lo + row} * p.n + col0 + col]) : 0.f;
  }
  if (tid < (1 << kBits)) table[tid] = ToF32(static_cast<const T*>(p.table)[tid]);
  __syncthreads();

  // 2. Thread -> (feature chunk cc: unit cc / 2, half cc % 2; k-pair), as above.
  const int lane = tid & 31, warp = tid >> 5;
  const int cc = lane & 15, half_warp = lane >> 4;
  const int u = cc >> 1, nhalf = cc & 1;
  if (u >= units) return;  // no barrier follows
  const uint32_t* unit = words + u * kStride;
  const int col = col0 + 8 * cc;
  const bool vector = (p.n % 8 == 0) && col + 8 <= p.n;
  T* w = static_cast<T*>(p.w);
#pragma unroll 2
  for (int it = 0; it < 8; ++it) {
    const int j = warp * 8 + it;                        // 64 k-pair pairs per block
    const int kp = 8 * (j >> 2) + (j & 3) + 4 * half_warp;  // k-pair in the K-block: rows 2 kp, 2 kp + 1
    const int kl = 2 * kp, t = kl >> 4, khalf = (kl >> 3) & 1, q = (kl >> 1) & 3;
    const int pr = nhalf + 2 * khalf;
    const int64_t row = k0 + kl;
    if (row >= p.k) continue;
    const float* srow = scales[static_cast<int>(row >> p.group_shift) - g_lo] + 8 * cc;
    float v0[8], v1[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int l = 4 * e + q;  // the lane whose fragment holds feature r = e of this half
      uint32_t code2;           // code of row k in bits [0, bits), of row k + 1 in [bits, 2 bits)
      if constexpr (kBits == 3) {
        int high_word, high_bit;
        HighPlanePair(t, pr, &high_word, &high_bit);
        const uint32_t lo = PairBits<2>(unit, l, t, pr), hi = (unit[256 + 4 * l + high_word] >> high_bit) & 3u;
        code2 = (lo & 3) | ((hi & 1) << 2) | ((lo >> 2) << 3) | ((hi >> 1) << 5);
      } else {
        code2 = PairBits<kBits>(unit, l, t, pr);
      }
      const float s = srow[e];
      v0[e] = table[code2 & ((1 << kBits) - 1)] * s;
      v1[e] = table[code2 >> kBits] * s;
    }
    T* dst = w + row * p.n + col;
    if (vector) {
      StoreChunk<T>(dst, v0);
      if (row + 1 < p.k) StoreChunk<T>(dst + p.n, v1);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (col + e < p.n) {
          dst[e] = FromF32<T>(v0[e]);
          if (row + 1 < p.k) dst[p.n + e] = FromF32<T>(v1[e]);
        }
      }
    }
  }
}

template <typename T>
cudaError_t LaunchDequant(cudaStream_t stream, int bits, const DequantParams& p, int k_blocks) {
  const dim3 grid((p.n_blocks + kUnitsPerBlock - 1) / kUnitsPerBlock, k_blocks);
  switch (bits) {
    case 2: DequantKernel<2, T><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: DequantKernel<3, T><<<grid, kThreads, 0, stream>>>(p); break;
    default: DequantKernel<4, T><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

ffi::Error DequantCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> codes, ffi::AnyBuffer scales,
                           ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> w, int64_t bits,
                           int64_t group_size) {
  auto fail = [](const std::string& msg) { return ffi::Error::InvalidArgument("flute_dequantize: " + msg); };
  if (bits < 2 || bits > 4) return fail("bits must be 2, 3 or 4, got " + std::to_string(bits));
  auto cd = codes.dimensions(), sd = scales.dimensions(), td = table.dimensions(), wd = w->dimensions();
  if (wd.size() != 2) return fail("w must be rank 2 [K, N], got " + DimsToString(wd));
  if (cd.size() != 3) return fail("codes must be rank 3, got " + DimsToString(cd));
  if (sd.size() != 2) return fail("scales must be rank 2 [G, N], got " + DimsToString(sd));
  if (td.size() != 1 || td[0] != (int64_t{1} << bits))
    return fail("table must be [2**bits], got " + DimsToString(td));
  const int64_t k = wd[0], n = wd[1];
  if (sd[1] != n) return fail("scales must have N = " + std::to_string(n) + " columns, got " + DimsToString(sd));
  const int64_t k_blocks = (k + kBlockK - 1) / kBlockK, n_blocks = (n + kBlockN - 1) / kBlockN;
  if (cd[0] != k_blocks || cd[1] != n_blocks || cd[2] != WordsPerUnit(static_cast<int>(bits)))
    return fail("codes must be [" + std::to_string(k_blocks) + ", " + std::to_string(n_blocks) + ", " +
                std::to_string(WordsPerUnit(static_cast<int>(bits))) + "] for K=" + std::to_string(k) +
                ", N=" + std::to_string(n) + ", got " + DimsToString(cd));
  const int64_t groups = group_size >= 1 ? (k + group_size - 1) / group_size : 0;
  const bool pow2 = group_size >= 32 && group_size <= 256 && (group_size & (group_size - 1)) == 0;
  if (!(groups == 1 || pow2))
    return fail("group_size must be 32, 64, 128, 256 or cover all of K, got " + std::to_string(group_size));
  if (sd[0] != groups)
    return fail("scales must have " + std::to_string(groups) + " rows, got " + DimsToString(sd));
  const auto type = w->element_type();
  if (!IsActivationType(type)) return fail("w must be float16, bfloat16 or float32");
  if (scales.element_type() != type || table.element_type() != type)
    return fail("scales and table must have w's dtype");
  if (k == 0 || n == 0) return ffi::Error::Success();
  if (k_blocks > 65535 || n_blocks > int64_t{1} << 30) return fail("K or N too large");

  DequantParams p;
  p.codes = codes.typed_data();
  p.scales = scales.untyped_data();
  p.table = table.untyped_data();
  p.w = w->untyped_data();
  p.k = k;
  p.n = n;
  p.n_blocks = static_cast<int>(n_blocks);
  p.groups = static_cast<int>(groups);
  int shift = 0;
  while ((int64_t{1} << shift) < group_size) ++shift;
  p.group_shift = groups == 1 ? 30 : shift;
  const int kb = static_cast<int>(k_blocks);
  cudaError_t status;
  switch (type) {
    case ffi::DataType::F16: status = LaunchDequant<__half>(stream, static_cast<int>(bits), p, kb); break;
    case ffi::DataType::BF16: status = LaunchDequant<__nv_bfloat16>(stream, static_cast<int>(bits), p, kb); break;
    default: status = LaunchDequant<float>(stream, static_cast<int>(bits), p, kb); break;
  }
  if (status != cudaSuccess)
    return ffi::Error::Internal(std::string("flute_dequantize: CUDA launch failed: ") + cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DequantCuda, DequantCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // packed codes
                                  .Arg<ffi::AnyBuffer>()         // scales [G, N]
                                  .Arg<ffi::AnyBuffer>()         // table [2**bits]
                                  .Ret<ffi::AnyBuffer>()         // w [K, N]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"),  // K rows per scale group
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace flute_jax

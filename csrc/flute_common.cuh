// What the two FLUTE kernels share: the block shape (8 consumer warps, each owning
// one 16-wide N-block of a 128-feature column, plus a producer warp), the kernel
// arguments, the Stream-K partition, the pair table and its lookups, and the end
// of a column (store, or the deterministic Stream-K fix-up).
//
//   qgemm_flute.cuh  decode (M <= 32 rows per launch): mma.sync, x via ldmatrix
//   qgemm_wgmma.cuh  batches and prefill (32-, 64- or 128-row x tiles, all of M in one launch; sm_90a): wgmma
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_types.cuh"
#include "epilogue.h"
#include "ptx.cuh"

namespace flute_jax {
namespace flute {

constexpr int kWarps = 8;                  // consumer warps; each owns one 16-wide N-block of a column
constexpr int kConsumers = 32 * kWarps;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kColumnN = 16 * kWarps;      // output features per Stream-K column
constexpr int kUnitK = 256;                // input features per iteration (one packed unit)
constexpr int kTiles = kUnitK / 16;
constexpr int kScaleRows = 8;              // scale rows of one unit (group_rows >= 32, powers of two)
constexpr int kCopies = 32;                // pair-table copies, one per bank
constexpr int kConsumerBarrier = 1;        // named barrier of the consumer warps (0 is __syncthreads)

// Kernel arguments (plain values: the kernels are capture-safe).
struct Params {
  const void* x;          // [M, K] activations (this launch's rows start here)
  const uint32_t* codes;  // packed codes
  const void* scales;     // [G, N]
  const void* table;      // [2**bits]
  void* y;                // [M, y_cols] (this launch's rows)
  float* partials;        // [2 * grid][m_tile][column features] Stream-K partial sums
  int* counters;          // [columns] arrivals per split column: zero at the start, and zero
                          // again at the end (the last arriver resets its column's counter)
  int m, k, n;            // rows (decode kernel: this launch's, <= its m_tile; tile kernel: all), K, N
  int n_blocks, k_units, columns;  // columns: of output features (the tile kernel's Stream-K
                                   // column cc covers x tile cc / columns, feature column cc % columns)
  int groups;
  int group_shift;        // log2(group_rows / 16); 30 when there is a single group
  // Stream-K partition of columns * k_units (< 2^31) iterations: block b runs
  // iters_per_block + (b < extra_iters) of them, starting at IterBegin(b).
  int iters_per_block, extra_iters;
  // Launched as a programmatic dependent of the stream's previous kernel (sm_90), which
  // may have written any operand: every thread waits for it before its first global read.
  int wait_prior;
  int epilogue;           // Epilogue (epilogue.h): applied where a column's values are stored
  int y_cols;             // columns of y: N, or N / 2 with the swiglu epilogue
};

// Developer probe (tools/timeline.cu): with FLUTE_JAX_TIMELINE defined, thread 0
// of each block stamps %globaltimer at the kernel's phases into g_timeline, to see
// where a small shape's time goes. Compiled out otherwise.
#ifdef FLUTE_JAX_TIMELINE
constexpr int kStamps = 8;
static __device__ unsigned long long g_timeline[8192][kStamps];
__device__ __forceinline__ void Stamp(int i) {
  if (threadIdx.x != 0) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  g_timeline[blockIdx.x][i] = t;
}
// The last slot: the block's multiprocessor and its Stream-K iterations.
__device__ __forceinline__ void StampBlock(int iterations) {
  if (threadIdx.x != 0) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  g_timeline[blockIdx.x][kStamps - 1] = sm | (static_cast<unsigned long long>(iterations) << 16);
}
#else
__device__ __forceinline__ void Stamp(int) {}
__device__ __forceinline__ void StampBlock(int) {}
#endif

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

// The pair table of 3- and 4-bit codes (2 bits take the quad table, QuadTable):
// 2^(2 bits) entries of two values, 32 copies interleaved so that lane l always reads
// bank l. The 3-bit table sits at an address aligned to its size, so a lookup address
// is one LOP3 away from the code bits: (index << 7) | (table + 4 * lane) has no carries.
template <int kBits, int kTableCopies = kCopies>
struct PairTable {
  static_assert(kBits == 3 || kBits == 4, "2-bit codes take the quad table");
  static constexpr int kShift = kTableCopies == 32 ? 7 : 6;  // log2 of an entry's bytes (all its copies)
  static constexpr int kBytes = (1 << (2 * kBits)) * kTableCopies * 4;
  static constexpr int kAlign = kBits == 4 ? 16 : kBytes;  // 4-bit: PRMT + LEA, no alignment
  static constexpr int kReserve = kBytes + (kAlign - 16);  // dynamic smem to reserve (base is 16-aligned)
};

// Stream-K bookkeeping in 32-bit integers (no 64-bit division on the device).
__device__ __forceinline__ int IterBegin(int b, const Params& p) {
  return b * p.iters_per_block + min(b, p.extra_iters);
}
__device__ __forceinline__ int BlockOf(int i, const Params& p) {
  const int big = p.extra_iters * (p.iters_per_block + 1);  // iterations of the longer blocks
  return i < big ? i / (p.iters_per_block + 1) : p.extra_iters + (i - big) / p.iters_per_block;
}
// Partial-sum slot of block b's part of column c, for a block whose range covers part
// of column c: slot 0 for the column its range starts in, slot 1 for the column it ends
// in (a block has at most two split columns). The range starts in c exactly when it
// starts at or after c's first iteration: a compare, not a division by k_units (the
// fix-up computes one per part before its loads can go out).
__device__ __forceinline__ int SlotOf(int b, int c, const Params& p) {
  return 2 * b + (IterBegin(b, p) >= c * p.k_units ? 0 : 1);
}

// The pair index held in bits [shift, shift + width) of `word`, moved to bits
// [7, 7 + width) (its offset in the 3-bit pair table) and OR-ed into `addr` (whose
// bits there are zero): a shift and one LOP3.
template <int kWidth>
__device__ __forceinline__ uint32_t PairBits(uint32_t word, int shift, uint32_t addr) {
  constexpr uint32_t mask = ((1u << kWidth) - 1) << 7;
  const uint32_t moved = shift >= 7 ? word >> (shift - 7) : word << (7 - shift);
  return (moved & mask) | addr;
}

// Builds the pair table at `pair_table` from the 2^bits values at `table`, by the
// block's consumer threads (tid < kConsumers). Returns this lane's address of
// entry 0, opaque to the compiler: otherwise it splits the sum into its terms
// and spends a second LOP3 per lookup re-joining them. With 16 copies (the 4-bit
// table of the tile kernel, to save shared memory) lanes l and l + 16 share one.
template <int kBits, typename T, int kTableCopies = kCopies>
__device__ __forceinline__ uint32_t BuildPairTable(const void* table_values, uint32_t* pair_table, int tid) {
  using T2 = typename Vec2<T>::type;
  __shared__ T table[1 << kBits];  // one global read per entry, then shared-memory reads
  if (tid < (1 << kBits)) table[tid] = static_cast<const T*>(table_values)[tid];
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  // One pair value per (entry, 16-byte chunk of its 32 copies): a few wide stores per thread.
  constexpr int kChunks = (1 << (2 * kBits)) * kTableCopies / 4;
#pragma unroll
  for (int i = tid; i < kChunks; i += kConsumers) {
    const int e = i / (kTableCopies / 4);
    int even, odd;
    if constexpr (kBits == 3) {  // 2-bit plane pair in bits 0..3, 1-bit plane pair in bits 4..5
      even = (e & 3) | (((e >> 4) & 1) << 2);
      odd = ((e >> 2) & 3) | (((e >> 5) & 1) << 2);
    } else {
      even = e & ((1 << kBits) - 1);
      odd = e >> kBits;
    }
    T2 v;
    v.x = table[even];
    v.y = table[odd];
    const uint32_t word = *reinterpret_cast<uint32_t*>(&v);
    reinterpret_cast<uint4*>(pair_table)[i] = make_uint4(word, word, word, word);
  }
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  uint32_t lane_addr = ptx::SharedAddress(pair_table) + 4 * (tid & (kTableCopies - 1));
  // A shuffle (of the lane's own value) hides the sum from ptxas too; an empty asm
  // statement hid it from the compiler's front end only, and ptxas, which knows the
  // two terms' bits are disjoint, kept them in two registers and re-joined them with a
  // second LOP3 in every 2- and 3-bit lookup (SASS: 338 instead of ~274 instructions
  // per 2-bit unit and warp, 466 at 3 bits).
  return __shfl_sync(0xffffffffu, lane_addr, tid & 31);
}

// The 6-bit pair indices of k-tiles 2 j and 2 j + 1 of a 3-bit unit, a byte each
// (bits 0-3 from the 2-bit plane, 4-5 from the 1-bit plane, 6-7 zero): for odd = 0 the
// pairs pr = 0 and 2, for odd = 1 the pairs 1 and 3; byte 2 (t & 1) + (pr >> 1) holds
// pair pr of tile t. The 2-bit plane word j holds pair pr of tile t in nibble
// v = 4 (t & 1) + pr; layout version 2 (layout.h, HighPlanePair) put its two high bits in
// byte v / 2 of the 1-bit plane word j / 2, at bit 4 + 2 odd for even j and 2 odd for
// odd j. So one shift of each word (none for even j and odd = 0) and one LOP3 merge four
// indices, and a lookup then needs one shift and one LOP3 (version 1 spent ~9
// instructions per 8 lookups on the merge).
__device__ __forceinline__ uint32_t ThreeBitIndices(const uint32_t (&w)[12], int j, int odd) {
  const uint32_t low = odd ? w[j] >> 4 : w[j];  // the pairs' nibbles at bits 0-3 of each byte
  const uint32_t high_plane = w[8 + (j >> 1)];
  const int at = ((j & 1) ? 0 : 4) + 2 * odd;  // where the high bits of byte m's pair sit in byte m
  const uint32_t high = at >= 4 ? high_plane >> (at - 4) : high_plane << (4 - at);
  uint32_t merged = (low & 0x0F0F0F0Fu) | (high & 0x30303030u);
  asm volatile("" : "+r"(merged));  // merged once for 4 lookups: NVVM would take it apart per lookup
  return merged;
}

// The A fragment (16 features x 16 k, mma/wgmma register order) of k-tile t of a
// lane's 3- or 4-bit unit, whose code words (plane by plane) are w: four pair lookups.
template <int kBits, int kTableCopies = kCopies>
__device__ __forceinline__ void LookupTile(const uint32_t (&w)[4 * kBits], int t, uint32_t lane_addr,
                                           uint32_t (&a)[4]) {
  static_assert(kBits == 4 || kTableCopies == 32, "the 3-bit lookups assume 32 copies");
#pragma unroll
  for (int pr = 0; pr < 4; ++pr) {
    uint32_t addr;
    if constexpr (kBits == 4) {
      // Byte pr of the word is the pair index: PRMT, then one LEA (index * entry bytes + lane copy).
      addr = (__byte_perm(w[t], 0, 0x4440 + pr) << PairTable<4, kTableCopies>::kShift) + lane_addr;
    } else {  // the pair index: low 4 bits from the 2-bit plane, high 2 from the 1-bit plane
      const uint32_t merged = ThreeBitIndices(w, t >> 1, pr & 1);
      addr = PairBits<6>(merged, 8 * (2 * (t & 1) + (pr >> 1)), lane_addr);
    }
    a[pr] = ptx::LdShared(addr);
  }
}

// The 2-bit kernels' table of quads: 2^8 entries, one per code byte, each the two pairs
// of that byte (four weights: two A registers), 16 copies 8 bytes apart. One 64-bit load
// replaces two pair lookups and their address arithmetic: the 2-bit decode kernel was
// bound by instruction issue (it then waits mostly on the lookups' latency: ncu, H200,
// session 18); the bytes per weight read from shared memory do not change. A warp's
// 64-bit load is served a half-warp at a time, so 16 copies keep every lane on its own
// banks (lane l: banks 2 (l % 16) and 2 (l % 16) + 1).
struct QuadTable {
  static constexpr int kCopies = 16;
  static constexpr int kShift = 7;  // log2 of an entry's bytes (all its copies)
  static constexpr int kBytes = 256 * kCopies * 8;
  static constexpr int kAlign = 16;
  static constexpr int kReserve = kBytes;
};

// Builds the quad table from the 4 values at `table_values` (consumer threads, like
// BuildPairTable); returns this lane's address of entry 0, hidden from ptxas.
template <typename T>
__device__ __forceinline__ uint32_t BuildQuadTable(const void* table_values, uint32_t* quad_table, int tid) {
  using T2 = typename Vec2<T>::type;
  __shared__ T table[4];
  if (tid < 4) table[tid] = static_cast<const T*>(table_values)[tid];
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  constexpr int kChunks = 256 * QuadTable::kCopies / 2;  // 16-byte chunks of two copies each
#pragma unroll
  for (int i = tid; i < kChunks; i += kConsumers) {
    const int e = i / (QuadTable::kCopies / 2);
    uint32_t pair[2];  // the pairs of the byte's low and high nibble (2-bit pair index: even | odd << 2)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int index = (e >> (4 * h)) & 15;
      T2 v;
      v.x = table[index & 3];
      v.y = table[index >> 2];
      pair[h] = *reinterpret_cast<uint32_t*>(&v);
    }
    reinterpret_cast<uint4*>(quad_table)[i] = make_uint4(pair[0], pair[1], pair[0], pair[1]);
  }
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  const uint32_t lane_addr = ptx::SharedAddress(quad_table) + 8 * (tid & (QuadTable::kCopies - 1));
  return __shfl_sync(0xffffffffu, lane_addr, tid & 31);
}

// The A fragment of k-tile t of a 2-bit unit from the quad table: byte b of the tile's
// 16-bit half of the code words holds pairs 2 b (low nibble) and 2 b + 1, i.e. A
// registers a[2 b] and a[2 b + 1]. Per byte: PRMT, IMAD, one 64-bit load.
__device__ __forceinline__ void LookupQuadTile(const uint32_t (&w)[8], int t, uint32_t lane_addr, uint32_t (&a)[4]) {
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    const uint32_t index = __byte_perm(w[t >> 1], 0, 0x4440 + 2 * (t & 1) + b);
    const uint2 v = ptx::LdShared64((index << QuadTable::kShift) + lane_addr);
    a[2 * b] = v.x;
    a[2 * b + 1] = v.y;
  }
}

// The lookup table of the kernels at `kBits`: quads at 2 bits, else pairs in
// kPairCopies copies.
template <int kBits, int kPairCopies = kCopies>
using LookupTable = std::conditional_t<kBits == 2, QuadTable, PairTable<kBits, kPairCopies>>;

// Builds LookupTable<kBits, kPairCopies> (consumer threads); returns this lane's address
// of entry 0.
template <int kBits, typename T, int kPairCopies = kCopies>
__device__ __forceinline__ uint32_t BuildLookupTable(const void* table_values, uint32_t* table, int tid) {
  if constexpr (kBits == 2)
    return BuildQuadTable<T>(table_values, table, tid);
  else
    return BuildPairTable<kBits, T, kPairCopies>(table_values, table, tid);
}

// The A fragment of k-tile t from LookupTable<kBits, kPairCopies>.
template <int kBits, int kPairCopies = kCopies>
__device__ __forceinline__ void LookupFragment(const uint32_t (&w)[4 * kBits], int t, uint32_t lane_addr,
                                               uint32_t (&a)[4]) {
  if constexpr (kBits == 2)
    LookupQuadTile(w, t, lane_addr, a);
  else
    LookupTile<kBits, kPairCopies>(w, t, lane_addr, a);
}

// A lane's code words of its warp's unit in a stage (16-byte loads, plane by plane).
template <int kBits>
__device__ __forceinline__ void LoadCodes(const uint32_t* unit, int lane, uint32_t (&w)[4 * kBits]) {
#pragma unroll
  for (int j = 0; j < kBits; ++j) {
    const uint4 v = *reinterpret_cast<const uint4*>(unit + 128 * j + 4 * lane);
    w[4 * j] = v.x; w[4 * j + 1] = v.y; w[4 * j + 2] = v.z; w[4 * j + 3] = v.w;
  }
}

// Producer: the codes of column c's (up to) kColumn / 16 units at k-block u into
// a stage, copied by kLanes producer threads with cp.async. Units past N (last
// column) are skipped.
template <int kBits, int kLanes = 32, int kColumn = kColumnN>
__device__ __forceinline__ void CopyCodes(const Params& p, int c, int u, int lane, uint32_t codes_dst) {
  constexpr int kUnitWords = 128 * kBits, kUnitChunks = kUnitWords / 4, kUnits = kColumn / 16;
  const uint32_t* src = p.codes + (static_cast<int64_t>(u) * p.n_blocks + c * kUnits) * kUnitWords;
  const int valid = min(kUnits, p.n_blocks - c * kUnits) * kUnitChunks;
#pragma unroll
  for (int i = 0; i < kUnits * kUnitChunks / kLanes; ++i) {
    const int chunk = lane + kLanes * i;
    ptx::CpAsync16If(codes_dst + 16 * chunk, src + 4 * chunk, chunk < valid);
  }
}

// Producer: the scale rows of column c's unit at k-block u that the consumers
// read (row g - g_lo for tiles t of the unit, g = t >> group_shift: 16 >>
// group_shift rows, at least one). Rows past the unit's last group and past N are
// zero, not left stale: a group past K still meets its tiles' sums (zero, from
// the zero x) in an FMA, and stale bytes could be Inf or NaN (compute-sanitizer
// found this). Rows never read are not copied.
template <typename T, int kLanes = 32, int kColumn = kColumnN>
__device__ __forceinline__ void CopyScales(const Params& p, int c, int u, int lane, uint32_t scales_dst) {
  const T* scales = static_cast<const T*>(p.scales);
  const int g_lo = (u * kTiles) >> p.group_shift;
  const int g_hi = min(p.groups - 1, (u * kTiles + kTiles - 1) >> p.group_shift);
  const int rows_read = max(1, kTiles >> p.group_shift);
#pragma unroll
  for (int i = 0; i < kScaleRows * (kColumn / 8) / kLanes; ++i) {
    const int idx = lane + kLanes * i, row = idx / (kColumn / 8), chunk = idx % (kColumn / 8);
    const int g = g_lo + row, nn = c * kColumn + 8 * chunk;
    const bool ok = g <= g_hi && nn < p.n;
    if (row < rows_read)
      ptx::CpAsync16(scales_dst + row * kColumn * 2 + 16 * chunk,
                     ok ? scales + static_cast<int64_t>(g) * p.n + nn : scales, ok);
  }
}

// Where this lane's values of a column go, for FinishColumn and ReduceColumn: value
// (h, i, j) of the lane is output row 8 i + 2 q + (j & 1) and feature r + 8 (j >> 1)
// of the warp's N-block h * 8 + warp of feature column c (mma accumulator order,
// r = lane / 4, q = lane % 4); its workspace slot holds [kMTile rows][kColumn features].
template <typename T, int kChunks, int kNB>
struct ColumnLane {
  static constexpr int kMTile = 8 * kChunks, kColumn = kColumnN * kNB;
  // Only rows < `rows` go through the workspace: the others are never stored, and
  // at M = 1 they would be 7/8 of the fix-up's L2 traffic. Not for the 128-row
  // tile: there the predicates slowed the fix-up (H100, M = 128: 4096 x 4096 went
  // 29.6 -> 37.0 us), and its tiles are full but for the last.
  static constexpr bool kTrimRows = kChunks <= 8;
  // Where a part lives in its workspace slot. With 4 and more 8-token chunks (the tile
  // kernel) each consumer thread keeps its values (h, i, 0..3) as one float4 at
  // vec_index(h, i): a warp's part stores and the fix-up's loads are 512 contiguous bytes
  // per instruction, and only the thread of the same index in the block that sums the
  // column reads them. In the [row][feature] layout, scalar accesses touched four 32-byte
  // segments per instruction and took 4x the instructions (H200, tools/timeline.cu: the
  // fix-up of 256 x 4096 x 4096 ran 5.6 us of a 27 us kernel). The decode kernel's 8- and
  // 16-row parts (one or two chunks) keep the [row][feature] layout, whose trimmed rows they rely on.
  static constexpr bool kThreadMajor = kChunks >= 4;
  int c, rows, n, n_blocks, epilogue, warp, r, q, tid;
  __device__ __forceinline__ ColumnLane(const Params& p, int column, int row_count)
      : c(column), rows(row_count), n(p.n), n_blocks(p.n_blocks), epilogue(p.epilogue) {
    tid = threadIdx.x;
    const int lane = tid & 31;
    warp = tid >> 5, r = lane >> 2, q = lane & 3;
  }
  // Whether N-block h of the column exists (the last column may be partial).
  __device__ __forceinline__ bool active(int h) const { return c * (kColumn / 16) + h * kWarps + warp < n_blocks; }
  __device__ __forceinline__ bool row_ok(int i, int j) const { return !kTrimRows || i * 8 + 2 * q + (j & 1) < rows; }
  __device__ __forceinline__ int slot_index(int h, int i, int j) const {
    return (i * 8 + 2 * q + (j & 1)) * kColumn + h * kColumnN + warp * 16 + r + 8 * (j >> 1);
  }
  // (kThreadMajor) float4 index of values (h, i, 0..3) in the slot; whether any of them is a row < rows.
  __device__ __forceinline__ int vec_index(int h, int i) const { return (h * kChunks + i) * kConsumers + tid; }
  __device__ __forceinline__ bool vec_ok(int i) const { return !kTrimRows || i * 8 + 2 * q < rows; }
  __device__ __forceinline__ void store(T* y, int h, int i, int j, float v) const {
    const int m = i * 8 + 2 * q + (j & 1), nn = c * kColumn + h * kColumnN + warp * 16 + r + 8 * (j >> 1);
    if (m < rows && nn < n) y[static_cast<int64_t>(m) * n + nn] = FromF32<T>(v);
  }
  // Stores the lane's values (h, i, 0..3): plainly, or under the swiglu epilogue (N % 16 == 0)
  // as two outputs silu(v0) * v2 and silu(v1) * v3, features r (a gate) and r + 8 (its up)
  // of the N-block being one pair; y then has N / 2 columns.
  __device__ __forceinline__ void store4(T* y, int h, int i, float v0, float v1, float v2, float v3) const {
    if (epilogue == kEpilogueSwiglu) {
      const int m = i * 8 + 2 * q, nn = c * kColumn + h * kColumnN + warp * 16;
      if (nn >= n) return;
      T* out = y + static_cast<int64_t>(m) * (n / 2) + nn / 2 + r;
      if (m < rows) out[0] = FromF32<T>(Swiglu(v0, v2));
      if (m + 1 < rows) out[n / 2] = FromF32<T>(Swiglu(v1, v3));
      return;
    }
    store(y, h, i, 0, v0);
    store(y, h, i, 1, v1);
    store(y, h, i, 2, v2);
    store(y, h, i, 3, v3);
  }
};

// The last arriver's part of FinishColumn: sums the parts of split column cc in
// block order and stores them.
template <typename T, int kChunks, int kNB>
__device__ __forceinline__ void ReduceColumn(const Params& p, int cc, int c, T* y, int rows, int first_block,
                                             int last_block) {
  const ColumnLane<T, kChunks, kNB> lane(p, c, rows);
  constexpr int kSlot = lane.kMTile * lane.kColumn;
  // Every part has landed: sum them in block order (deterministic).
  if constexpr (lane.kThreadMajor) {
    // One pass over the parts: each part's kChunks float4s of an N-block are loaded
    // together, so a column of P parts costs P L2 round trips per N-block, where passes of
    // four chunks cost kChunks / 4 * P. H200, 4-bit g128, 8 Llama-3 shapes: 1.01x / 1.03x /
    // 1.02x at M = 64 / 128 / 256 (BENCHMARKS.md, "Session 25"). From 8 chunks on, the
    // parts go one at a time (a 128-row tile's 16 float4s per part fill the registers). At
    // 4 chunks (32 rows) four parts stay unrolled: one at a time lost 1% there (8B o: 4%).
    constexpr int kPartsUnrolled = kChunks >= 8 ? 1 : 4;
#pragma unroll
    for (int h = 0; h < kNB; ++h) {
      if (!lane.active(h)) continue;
      float4 sum[kChunks];
#pragma unroll
      for (int i = 0; i < kChunks; ++i) sum[i] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll kPartsUnrolled
      for (int b = first_block; b <= last_block; ++b) {
        const float4* part = reinterpret_cast<const float4*>(p.partials + static_cast<int64_t>(SlotOf(b, cc, p)) * kSlot);
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
          if (!lane.vec_ok(i)) continue;
          const float4 v = __ldcg(part + lane.vec_index(h, i));
          sum[i].x += v.x, sum[i].y += v.y, sum[i].z += v.z, sum[i].w += v.w;
        }
      }
#pragma unroll
      for (int i = 0; i < kChunks; ++i) lane.store4(y, h, i, sum[i].x, sum[i].y, sum[i].z, sum[i].w);
    }
  } else {
    // The decode kernel's [row][feature] parts: one or two 8-token chunks per lane. The
    // 8-row launch loads up to kBatch parts before it sums any, so a column of up to 8
    // parts costs one L2 round trip: its small shapes have 5-10 parts (8B o at M = 1:
    // about 9), and the whole kernel waits for the last column's fix-up (H200, 4096 x
    // 4096, M = 1: fix-up 1.59 -> 1.24 us). Loads past the last part are predicated off,
    // not repeated: at 8 rows a part is 4 KB a block reads from L2, and repeating the last
    // one made columns of few parts 3-6% slower. The 16-row launch takes one part at a time.
    constexpr int kBatch = kChunks == 1 ? 8 : 1;
#pragma unroll
    for (int h = 0; h < kNB; ++h) {
      if (!lane.active(h)) continue;
      float sum[kChunks][4];
#pragma unroll
      for (int i = 0; i < kChunks; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[i][j] = 0.f;
      if constexpr (kBatch > 1) {
        for (int b0 = first_block; b0 <= last_block; b0 += kBatch) {
          float v[kBatch][kChunks][4];
#pragma unroll
          for (int bb = 0; bb < kBatch; ++bb) {
            const bool exists = b0 + bb <= last_block;
            const float* part = p.partials + static_cast<int64_t>(SlotOf(min(b0 + bb, last_block), cc, p)) * kSlot;
#pragma unroll
            for (int i = 0; i < kChunks; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j)
                v[bb][i][j] = exists && lane.row_ok(i, j) ? __ldcg(part + lane.slot_index(h, i, j)) : 0.f;
          }
#pragma unroll
          for (int bb = 0; bb < kBatch; ++bb)
            if (b0 + bb <= last_block)
#pragma unroll
              for (int i = 0; i < kChunks; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) sum[i][j] += v[bb][i][j];
        }
      } else {
#pragma unroll 4
        for (int b = first_block; b <= last_block; ++b) {
          const float* part = p.partials + static_cast<int64_t>(SlotOf(b, cc, p)) * kSlot;
#pragma unroll
          for (int i = 0; i < kChunks; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
              if (lane.row_ok(i, j)) sum[i][j] += __ldcg(part + lane.slot_index(h, i, j));
        }
      }
#pragma unroll
      for (int i = 0; i < kChunks; ++i) lane.store4(y, h, i, sum[i][0], sum[i][1], sum[i][2], sum[i][3]);
    }
  }
}

// The same, not inlined, for the decode kernel: it runs once per split column, and
// kept out of the main loop it leaves the loop's registers alone (mb2 lost its spills).
template <typename T, int kChunks, int kNB>
__device__ __noinline__ void ReduceColumnCall(const Params p, int cc, int c, T* y, int rows, int first_block,
                                              int last_block) {
  ReduceColumn<T, kChunks, kNB>(p, cc, c, y, rows, first_block, last_block);
}

// End of a segment of Stream-K column cc, which covers feature column c of the
// rows' outputs at y (`rows` of them, row stride p.y_cols): acc[h] holds this block's part of the column's
// outputs for this lane (stored through p's epilogue), for the warp's N-block h * 8 + warp of the column (each
// warp owns kNB N-blocks, 128 features apart), in mma accumulator order per
// 8-token chunk i: acc[h][i][j] = y[8 i + 2 q + (j & 1), feature r + 8 (j >> 1)
// of the N-block], r = lane / 4, q = lane % 4. A column the block ran whole is
// stored; a split column's part goes to the workspace, and the block that
// finishes last sums all parts in block order (bitwise deterministic) and stores
// the result. Called by all consumer threads (it has named barriers).
template <typename T, int kChunks, int kNB>
__device__ __forceinline__ void FinishColumn(const Params& p, int cc, int c, T* y, int rows,
                                             const float (&acc)[kNB][kChunks][4], int* s_is_last) {
  const ColumnLane<T, kChunks, kNB> lane(p, c, rows);
  const int first_block = BlockOf(cc * p.k_units, p);
  const int last_block = BlockOf((cc + 1) * p.k_units - 1, p);
  Stamp(3);  // the segment's compute is done
  if (first_block == last_block) {  // the whole column was ours
#pragma unroll
    for (int h = 0; h < kNB; ++h)
      if (lane.active(h))
#pragma unroll
        for (int i = 0; i < kChunks; ++i) lane.store4(y, h, i, acc[h][i][0], acc[h][i][1], acc[h][i][2], acc[h][i][3]);
    return;
  }
  // (Only rows < `rows` go through the workspace: ColumnLane::kTrimRows.)
  float* mine = p.partials + static_cast<int64_t>(SlotOf(blockIdx.x, cc, p)) * lane.kMTile * lane.kColumn;
#pragma unroll
  for (int h = 0; h < kNB; ++h)
    if (lane.active(h))
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        if constexpr (lane.kThreadMajor) {
          if (lane.vec_ok(i))
            __stcg(reinterpret_cast<float4*>(mine) + lane.vec_index(h, i),
                   make_float4(acc[h][i][0], acc[h][i][1], acc[h][i][2], acc[h][i][3]));
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (lane.row_ok(i, j)) __stcg(mine + lane.slot_index(h, i, j), acc[h][i][j]);
        }
      }
  // Publish the part: the barrier orders every consumer's stores before thread
  // 0's release (the pattern of CUTLASS's split-K semaphore); the last arriver's
  // acquire, then the barrier, order the reads of all parts.
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  if (threadIdx.x == 0) {
    // Workspace counters are zeroed by a kernel launched just before this one, which
    // lets this grid start early (programmatic dependent launch, sm_90): wait for it
    // here, at the first use of a counter, not at the start. (A no-op when the
    // counters are the call site's own and this grid was launched plainly.)
    ptx::GridDependencyWait();
    const bool last = ptx::AtomicAddAcqRel(&p.counters[cc], 1) == last_block - first_block;
    // Every part has arrived: the counter is free to start at zero for the next
    // launch, which begins after this grid ends (call_counters.h).
    if (last) p.counters[cc] = 0;
    *s_is_last = last;
  }
  ptx::NamedBarrier(kConsumerBarrier, kConsumers);
  Stamp(4);  // the counter is known
  if (!*s_is_last) return;
  if constexpr (kChunks <= 2)
    ReduceColumnCall<T, kChunks, kNB>(p, cc, c, y, rows, first_block, last_block);
  else  // (the 32-row launch and the tile kernel spilled more with the call)
    ReduceColumn<T, kChunks, kNB>(p, cc, c, y, rows, first_block, last_block);
  Stamp(5);  // the fix-up is done
}

}  // namespace flute
}  // namespace flute_jax

// Which CUDA kernel a qgemm call takes, and the workspace the FLUTE kernel
// needs. Host-only and shared: the CUDA handler follows the plan, and Python
// asks for the workspace size at lowering time (flute_jax/primitive.py), so the
// two never disagree.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flute_jax {

struct FlutePlan {
  bool fast = false;          // a FLUTE kernel (else the simple kernel)
  bool wgmma = false;         // the wgmma tile kernel (sm_90a), else the mma.sync decode kernel
  int m_blocks = 0;           // decode kernel: 8-row mma blocks per launch, 1, 2 or 4
  int rows_per_launch = 0;    // decode kernel: M is covered in launches of 8 * m_blocks rows;
                              // tile kernel: the x tile, 32, 64 or 128 rows (one launch for all of M)
  int row_tiles = 1;          // tile kernel: x tiles; Stream-K runs over row_tiles * columns columns
  int column_n = 0;           // output features per Stream-K column: 128, or 256 (a large tile-kernel problem, or
                              // two N-blocks per warp in the decode kernel)
  int columns = 0;            // Stream-K columns of column_n output features
  int k_units = 0;            // 256-k iterations per column
  int grid = 0;               // persistent blocks
  int64_t workspace_bytes = 0;
};

constexpr int kFluteColumnN = 128, kFluteTileColumnN = 256, kFluteUnitK = 256;

// Whether the FLUTE kernel takes a call: f16/bf16, K and N multiples of 8
// (16-byte rows), one group or a power-of-two group size from 32 to 256.
inline bool FluteApplies(int64_t m, int64_t k, int64_t n, int64_t group_rows, bool is_half_type) {
  const int64_t groups = (k + group_rows - 1) / group_rows;
  const bool pow2_group = group_rows >= 32 && group_rows <= 256 && (group_rows & (group_rows - 1)) == 0;
  // The kernel indexes Stream-K iterations (128-feature columns x 256-k units) in 32 bits.
  const int64_t iterations = ((n + kFluteColumnN - 1) / kFluteColumnN) * ((k + kFluteUnitK - 1) / kFluteUnitK);
  return is_half_type && m >= 1 && k % 8 == 0 && n % 8 == 0 && (groups == 1 || pow2_group) &&
         iterations < (int64_t{1} << 31) && m < (int64_t{1} << 31);
}

// The Stream-K workspace: two fp32 partial-sum slots of [rows_per_launch, column_n]
// per block, then one int counter per column.
inline int64_t FluteSlotBytes(const FlutePlan& plan) { return int64_t{plan.rows_per_launch} * plan.column_n * 4; }
inline int64_t FluteCounterOffset(const FlutePlan& plan) { return 2 * int64_t{plan.grid} * FluteSlotBytes(plan); }
// Stream-K counters of a launch: one per (x tile, feature column).
inline int64_t FluteCounterCount(const FlutePlan& plan) { return int64_t{plan.row_tiles} * plan.columns; }

inline int FluteMBlocks(int64_t m) { return m <= 8 ? 1 : m <= 16 ? 2 : 4; }

// Stream-K iterations of the tile kernel for an x tile of `rows` and columns of
// `column_n` features.
inline int64_t FluteTileIterations(int64_t m, int64_t k, int64_t n, int rows, int column_n) {
  return ((m + rows - 1) / rows) * ((n + column_n - 1) / column_n) * ((k + kFluteUnitK - 1) / kFluteUnitK);
}

// Rows of x per tile of the tile kernel. Up to 32 rows, a 32-row tile halves the
// tensor cores' reads of x from shared memory (wgmma's B) against a 64-row one, and
// the multiplies of rows that do not exist. Above 64 rows, 128-row tiles, unless
// they leave fewer than 6 Stream-K iterations per multiprocessor: then 64-row tiles,
// twice the iterations, keep every multiprocessor streaming (H200, M = 128:
// 4096 x 4096 with 3.9 iterations per SM went 26.3 -> 20.0 us, 4096 x 6144 with 5.8
// went 27.7 -> 25.8 us; with 7.8 and more 64-row tiles lost, 4096 x 4096 at M = 256
// by 3%, 8192 x 8192 at M = 128 by 13%).
inline int FluteTileRows(int64_t m, int64_t k, int64_t n, int64_t sm_count) {
  if (m <= 32) return 32;
  if (m <= 64) return 64;
  return FluteTileIterations(m, k, n, 128, kFluteColumnN) < 6 * sm_count ? 64 : 128;
}

// The tile kernel's column width. 256 features halve the x traffic per
// multiply-add, but split the problem into half as many, twice as long Stream-K
// iterations, with twice the fix-up per split column. They pay only from about 48
// iterations per block (H200, M = 128..512 over the Llama-3 8B/70B shapes:
// 8192 x 57344 at M = 256 has 108 and went 395 -> 375 us with them, 28672 x 8192 at
// M = 256 has 54 and went 220 -> 207 us; below that 128-feature columns won by 2-32%,
// e.g. 4096 x 6144 at M = 384 with 8.7: 60.7 -> 46.1 us, and 28672 x 8192 at M = 128
// with 27: 131.7 -> 120.2 us).
inline int FluteTileColumnN(int64_t m, int64_t k, int64_t n, int tile_rows, int64_t grid) {
  return FluteTileIterations(m, k, n, tile_rows, kFluteTileColumnN) >= 48 * grid ? kFluteTileColumnN : kFluteColumnN;
}

// The plan for a call the kernel applies to, given the GPU's multiprocessors and
// how many blocks of the chosen kernel (decode, or tile when `wgmma`) fit on one;
// tile_rows is the tile kernel's x tile (0: FluteTileRows), column_n either kernel's column width.
inline FlutePlan PlanFlute(int64_t m, int64_t k, int64_t n, int64_t group_rows, bool is_half_type,
                           int sm_count, int blocks_per_sm, bool wgmma = false, int tile_rows = 0,
                           int column_n = kFluteColumnN) {
  FlutePlan plan;
  plan.fast = FluteApplies(m, k, n, group_rows, is_half_type) && sm_count > 0 && blocks_per_sm > 0;
  if (!plan.fast) return plan;
  plan.wgmma = wgmma;
  plan.m_blocks = wgmma ? 0 : FluteMBlocks(m);
  plan.rows_per_launch = wgmma ? (tile_rows ? tile_rows : FluteTileRows(m, k, n, sm_count)) : 8 * plan.m_blocks;
  plan.column_n = column_n;
  plan.columns = static_cast<int>((n + plan.column_n - 1) / plan.column_n);
  plan.k_units = static_cast<int>((k + kFluteUnitK - 1) / kFluteUnitK);
  const int64_t row_tiles = wgmma ? (m + plan.rows_per_launch - 1) / plan.rows_per_launch : 1;
  const int64_t iters = row_tiles * plan.columns * plan.k_units;
  if (iters >= (int64_t{1} << 31)) return FlutePlan{};  // the kernels index iterations in 32 bits
  plan.row_tiles = static_cast<int>(row_tiles);
  plan.grid = static_cast<int>(std::min<int64_t>(iters, int64_t{sm_count} * blocks_per_sm));
  plan.workspace_bytes = FluteCounterOffset(plan) + FluteCounterCount(plan) * 4;
  return plan;
}

}  // namespace flute_jax

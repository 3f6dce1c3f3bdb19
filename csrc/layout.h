// The canonical packed layout of LUT codes (documented bit by bit in
// flute_jax/layout.py, which writes it). This header decodes single codes; the
// CPU kernel and the simple CUDA kernel use it, the fast kernel reads whole
// lane streams instead.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FJ_HD __host__ __device__ __forceinline__
#else
#define FJ_HD inline
#endif

namespace flute_jax {

constexpr int kBlockK = 256;  // input features per unit
constexpr int kBlockN = 16;   // output features per unit

FJ_HD int WordsPerUnit(int bits) { return 128 * bits; }

// Width of the first plane and of the second (0 if none) of a `bits`-bit code.
FJ_HD int FirstPlaneWidth(int bits) { return bits == 4 ? 4 : 2; }
FJ_HD int SecondPlaneWidth(int bits) { return bits == 3 ? 1 : 0; }

// Where the 3-bit code's high (1-bit) plane keeps the two bits of pair `pair` of k-tile
// `tile` in a lane's four words: word `*word` (0..3, at 4 * lane + *word of the plane),
// bits [*bit, *bit + 2) (even k low). Layout version 2 (layout.py): the 2-bit plane word
// j = tile / 2 holds the pair's low bits in nibble v = 4 (tile % 2) + pair; the high bits
// sit in byte v / 2 of word j / 2, at bit 4 + 2 (v % 2) of it for even j and 2 (v % 2)
// for odd j, so the fast kernels merge four pairs' 6-bit indices with one LOP3
// (flute_common.cuh, ThreeBitIndices).
FJ_HD void HighPlanePair(int tile, int pair, int* word, int* bit) {
  const int j = tile >> 1, v = 4 * (tile & 1) + pair;
  *word = j >> 1;
  *bit = 8 * (v >> 1) + ((j & 1) ? 0 : 4) + 2 * (v & 1);
}

// Code at (k, n), 0 <= k < 256, 0 <= n < 16, inside one unit of words.
FJ_HD uint32_t CodeInUnit(const uint32_t* unit, int bits, int k, int n) {
  const int tile = k >> 4, kk = k & 15;
  const int q = (kk & 7) >> 1, k_half = kk >> 3, k_odd = kk & 1;
  const int lane = 4 * (n & 7) + q;
  const int pair = (n >> 3) + 2 * k_half;
  const int w = FirstPlaneWidth(bits);
  const int s = 8 * w * tile + 2 * w * pair + w * k_odd;  // position in the lane's stream
  const uint32_t word = unit[128 * (s >> 7) + 4 * lane + ((s >> 5) & 3)];
  uint32_t code = (word >> (s & 31)) & ((1u << w) - 1);
  if (SecondPlaneWidth(bits) > 0) {  // 3 bits: the high bit from the 1-bit plane
    int high_word, high_bit;
    HighPlanePair(tile, pair, &high_word, &high_bit);
    code |= ((unit[128 * w + 4 * lane + high_word] >> (high_bit + k_odd)) & 1u) << w;
  }
  return code;
}

// Code at (k, n) of the whole packed array with `n_blocks` N-blocks.
FJ_HD uint32_t CodeAt(const uint32_t* packed, int64_t n_blocks, int bits, int64_t k, int64_t n) {
  const uint32_t* unit =
      packed + ((k / kBlockK) * n_blocks + n / kBlockN) * static_cast<int64_t>(WordsPerUnit(bits));
  return CodeInUnit(unit, bits, static_cast<int>(k % kBlockK), static_cast<int>(n % kBlockN));
}

}  // namespace flute_jax

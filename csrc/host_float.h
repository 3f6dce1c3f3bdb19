// float16 / bfloat16 <-> float32 on the host, bit-exact IEEE conversions with
// round-to-nearest-even (what the GPU's __float2half_rn / __float2bfloat16_rn do).
#pragma once

#include <cstdint>
#include <cstring>

namespace flute_jax {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float BitsToFloat(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t FloatToBits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float ToFloat(float v) { return v; }
inline float ToFloat(BFloat16 v) { return BitsToFloat(uint32_t{v.bits} << 16); }
inline float ToFloat(Half v) {
  const uint32_t sign = uint32_t{v.bits & 0x8000u} << 16;
  uint32_t exp = (v.bits >> 10) & 0x1f, man = v.bits & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    if (man == 0) return BitsToFloat(sign);
    // Subnormal: value = man * 2^-24.
    float f = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  return BitsToFloat(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T> T FromFloat(float f);
template <> inline float FromFloat<float>(float f) { return f; }
template <> inline BFloat16 FromFloat<BFloat16>(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
template <> inline Half FromFloat<Half>(float f) {
  const uint32_t u = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to Inf
  if (a < 0x38800000u) {  // result is subnormal or zero: round a * 2^24 to an integer
    const float scaled = BitsToFloat(a) * 16777216.0f;  // exact (power of two)
    const uint32_t whole = static_cast<uint32_t>(scaled);
    const float frac = scaled - static_cast<float>(whole);
    uint32_t r = whole + ((frac > 0.5f || (frac == 0.5f && (whole & 1u))) ? 1u : 0u);
    return {static_cast<uint16_t>(sign | r)};
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return {static_cast<uint16_t>(sign | h)};
}

}  // namespace flute_jax

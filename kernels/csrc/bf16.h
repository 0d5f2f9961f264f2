// bf16 <-> fp32 for the CPU kernels: bf16 values are the upper 16 bits of an fp32, carried as
// uint16_t. Widening is exact; narrowing rounds to nearest even, as torch's casts do, so a
// kernel that rounds where torch's bf16 ops round gives torch's bits.

#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace pagedserve {

typedef uint16_t bf16;

inline float bf16_to_f32(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 f32_to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// 16 consecutive bf16 values as fp32.
inline v16 load16(const bf16* p) {
  typedef uint16_t h16 __attribute__((vector_size(32)));
  typedef uint32_t u16x32 __attribute__((vector_size(64)));
  h16 h;
  std::memcpy(&h, p, sizeof h);
  const u16x32 u = __builtin_convertvector(h, u16x32) << 16;
  v16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// Element type traits of the kernels templated on float / bf16: what they load as fp32 and
// store back (rounded once).
inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return bf16_to_f32(x); }
template <typename T> inline T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }

}  // namespace pagedserve

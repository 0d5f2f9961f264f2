// bf16 <-> fp32 for the CPU kernels: bf16 values are the upper 16 bits of an fp32, carried as
// uint16_t. Widening is exact; narrowing rounds to nearest even, as torch's casts do, so a
// kernel that rounds where torch's bf16 ops round gives torch's bits.

#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// 16 consecutive bf16 values as fp32 (with AVX-512 one zero-extending load and a shift; the
// generic vector code made GCC widen each half separately, ~10% of decode attention's time).
inline v16 load16(const bf16* p) {
#if defined(__AVX512F__)
  const __m512i u = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<v16>(_mm512_castsi512_ps(u));
#else
  typedef uint16_t h16 __attribute__((vector_size(32)));
  typedef uint32_t u16x32 __attribute__((vector_size(64)));
  h16 h;
  std::memcpy(&h, p, sizeof h);
  const u16x32 u = __builtin_convertvector(h, u16x32) << 16;
  v16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}

// Each lane rounded to bf16 (nearest even; NaN stays a quiet NaN), kept as fp32.
inline v16 round16(v16 v) {
#if defined(__AVX512F__)
  const __m512i u = _mm512_castps_si512(reinterpret_cast<__m512>(v));
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), high);
  const __mmask16 nan = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v),
                                           reinterpret_cast<__m512>(v), _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(
      r, nan, _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x400000)), high));
  return reinterpret_cast<v16>(_mm512_castsi512_ps(r));
#else
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  for (float& f : lanes) f = round_bf16(f);
  std::memcpy(&v, lanes, sizeof v);
  return v;
#endif
}

// Stores the 16 lanes as bf16, rounded as round16.
inline void store16(bf16* p, v16 v) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_srli_epi32(
      _mm512_castps_si512(reinterpret_cast<__m512>(round16(v))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
#else
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int i = 0; i < 16; ++i) p[i] = f32_to_bf16(lanes[i]);
#endif
}

// Element type traits of the kernels templated on float / bf16: what they load as fp32 and
// store back (rounded once).
inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return bf16_to_f32(x); }
template <typename T> inline T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }

}  // namespace pagedserve

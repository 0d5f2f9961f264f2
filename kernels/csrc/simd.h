// What the CPU kernels share: a 16-float vector type and a vectorisable exp.
#pragma once

#include <cstdint>
#include <cstring>

namespace pagedserve {

typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The widest vector the build's registers hold: what hot loops keep in registers.
#if defined(__AVX512F__)
typedef v16 vec;
constexpr int kLanes = 16;
#else
typedef float vec __attribute__((vector_size(32)));  // AVX2: 8 floats
constexpr int kLanes = 8;
#endif

inline vec load_vec(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// exp(x) = 2^n * e^r, n = round(x / ln2): Cephes expf's degree-6 polynomial for e^r on
// [-ln2/2, ln2/2] (~1 ulp), for a float or 16 of them alike; sets n.
template <typename V>
inline V exp_mantissa(V x, V& n) {
  n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V y{};
  y += 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

// exp(x) with x clamped to [-87, 88] (below: exp(-87) ~ 1.6e-38). Written so that `omp simd`
// loops vectorise it.
inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n;
  const float y = exp_mantissa(x, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// exp_clamped on 16 lanes at once (the same steps, so the same results).
inline v16 exp16(v16 x) {
  typedef int32_t i16x32 __attribute__((vector_size(64)));
  const v16 lo = v16{} - 87.0f, hi = v16{} + 88.0f;
  x = x < lo ? lo : (x > hi ? hi : x);
  v16 n;
  const v16 y = exp_mantissa(x, n);
  const i16x32 bits = (__builtin_convertvector(n, i16x32) + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

}  // namespace pagedserve

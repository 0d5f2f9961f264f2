// The element-wise steps of a decoder layer, one row at a time: residual add + RMSNorm,
// SiLU-and-mul, half-split rotary, in fp32 and in bf16. The bf16 rows compute in fp32 and
// round to bf16 wherever transformers' bf16 modules do (after the residual add, the normed
// value before its weight, each product and sum of the rotary, SiLU before its product), so
// they give the bits of the torch code they replace. Used by fused_cpu.cpp and decoder_cpu.cpp.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "simd.h"

namespace pagedserve {

// out = weight * rms_norm(in); `out` may be `in` (the sum is taken before any write).
inline void rms_norm_row(const float* in, const float* __restrict weight, float* out,
                         int64_t cols, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) sum += in[j] * in[j];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(cols) + eps);
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) out[j] = weight[j] * (in[j] * inv);
}

// h += x (skipped when x is null), then out = weight * rms_norm(h).
inline void add_rms_norm_row(const float* __restrict x, float* __restrict h,
                             const float* __restrict weight, float* __restrict out,
                             int64_t cols, float eps) {
  if (x != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) h[j] += x[j];
  }
  rms_norm_row(h, weight, out, cols, eps);
}

inline void silu_and_mul_row(const float* __restrict gate, const float* __restrict up,
                             float* __restrict out, int64_t cols) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) out[j] = gate[j] / (1.0f + exp_clamped(-gate[j])) * up[j];
}

// `heads` heads of head_dim side by side in x, rotated in place; c, s: [head_dim], both halves
// equal.
inline void rotary_row(float* x, const float* __restrict c, const float* __restrict s,
                       int heads, int head_dim) {
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    float* __restrict lo = x + static_cast<int64_t>(h) * head_dim;
    float* __restrict hi = lo + half;
#pragma omp simd
    for (int j = 0; j < half; ++j) {
      const float a = lo[j], b = hi[j];
      lo[j] = a * c[j] - b * s[j];
      hi[j] = b * c[j + half] + a * s[j + half];
    }
  }
}

// The bf16 rows run 16 columns per vector (load16 / round16 / store16), the rest one by one:
// GCC's own vectorisation of the per-value conversions ran them at half the fp32 rows' speed.
inline float sum_lanes(v16 v) {
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  float sum = 0.0f;
  for (float f : lanes) sum += f;
  return sum;
}

inline void rms_norm_row(const bf16* in, const bf16* __restrict weight, bf16* out,
                         int64_t cols, float eps) {
  v16 squares{};
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    const v16 v = load16(in + j);
    squares += v * v;
  }
  float sum = sum_lanes(squares);
  for (int64_t k = j; k < cols; ++k) sum += to_f32(in[k]) * to_f32(in[k]);
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(cols) + eps);
  for (j = 0; j + 16 <= cols; j += 16)
    store16(out + j, load16(weight + j) * round16(load16(in + j) * inv));
  for (; j < cols; ++j)
    out[j] = f32_to_bf16(to_f32(weight[j]) * round_bf16(to_f32(in[j]) * inv));
}

inline void add_rms_norm_row(const bf16* __restrict x, bf16* __restrict h,
                             const bf16* __restrict weight, bf16* __restrict out, int64_t cols,
                             float eps) {
  if (x != nullptr) {
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) store16(h + j, load16(h + j) + load16(x + j));
    for (; j < cols; ++j) h[j] = f32_to_bf16(to_f32(h[j]) + to_f32(x[j]));
  }
  rms_norm_row(h, weight, out, cols, eps);
}

inline void silu_and_mul_row(const bf16* __restrict gate, const bf16* __restrict up,
                             bf16* __restrict out, int64_t cols) {
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    const v16 g = load16(gate + j);
    store16(out + j, round16(g / (1.0f + exp16(-g))) * load16(up + j));
  }
  for (; j < cols; ++j) {
    const float g = to_f32(gate[j]);
    out[j] = f32_to_bf16(round_bf16(g / (1.0f + exp_clamped(-g))) * to_f32(up[j]));
  }
}

inline void rotary_row(bf16* x, const bf16* __restrict c, const bf16* __restrict s, int heads,
                       int head_dim) {
  const int half = head_dim / 2;
  for (int h = 0; h < heads; ++h) {
    bf16* __restrict lo = x + static_cast<int64_t>(h) * head_dim;
    bf16* __restrict hi = lo + half;
    int j = 0;
    for (; j + 16 <= half; j += 16) {
      const v16 a = load16(lo + j), b = load16(hi + j);
      store16(lo + j, round16(a * load16(c + j)) - round16(b * load16(s + j)));
      store16(hi + j, round16(b * load16(c + j + half)) + round16(a * load16(s + j + half)));
    }
    for (; j < half; ++j) {
      const float a = to_f32(lo[j]), b = to_f32(hi[j]);
      lo[j] = f32_to_bf16(round_bf16(a * to_f32(c[j])) - round_bf16(b * to_f32(s[j])));
      hi[j] = f32_to_bf16(round_bf16(b * to_f32(c[j + half]))
                          + round_bf16(a * to_f32(s[j + half])));
    }
  }
}

}  // namespace pagedserve

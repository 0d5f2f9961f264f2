// Fused element-wise steps of a decoder layer on CPU, fp32, each one pass over its rows instead
// of the 2-8 torch ops (and their dispatch) it replaces:
//   add_rms_norm: residual += x; out = weight * rms_norm(residual)      (x may be null)
//   silu_and_mul: out = silu(gate) * up, gate and up the two halves of each input row
//   rotary:       half-split RoPE of the heads of each row, in place, cos/sin per row
// Rows are spread over OpenMP threads (torch's libgomp, already loaded) when there are enough
// of them to pay for waking the threads.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

constexpr int64_t kParallelElements = 1 << 16;  // below this, one thread

inline int threads_for(int64_t elements, int num_threads) {
  return elements >= kParallelElements ? num_threads : 1;
}

using pagedserve::exp_clamped;

}  // namespace

extern "C" {

void pagedserve_add_rms_norm_f32(const float* x, int64_t stride_x, float* residual,
                                 int64_t stride_residual, const float* weight, float* out,
                                 int64_t stride_out, int64_t rows, int64_t cols, float eps,
                                 int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads))
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict h = residual + i * stride_residual;
    if (x != nullptr) {
      const float* __restrict xi = x + i * stride_x;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) h[j] += xi[j];
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += h[j] * h[j];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(cols) + eps);
    float* __restrict o = out + i * stride_out;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = weight[j] * (h[j] * inv);
  }
}

void pagedserve_silu_and_mul_f32(const float* x, int64_t stride_x, float* out, int64_t stride_out,
                                 int64_t rows, int64_t cols, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads))
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict gate = x + i * stride_x;
    const float* __restrict up = gate + cols;
    float* __restrict o = out + i * stride_out;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = gate[j] / (1.0f + exp_clamped(-gate[j])) * up[j];
  }
}

// x: [rows, heads, head_dim] (head stride head_dim, row stride stride_x); cos, sin:
// [rows, head_dim] (row stride head_dim), the half-split layout (both halves equal).
void pagedserve_rotary_f32(float* x, int64_t stride_x, const float* cos, const float* sin,
                           int64_t rows, int heads, int head_dim, int num_threads) {
  const int half = head_dim / 2;
#pragma omp parallel for num_threads(threads_for(rows * heads * head_dim, num_threads))
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict c = cos + i * head_dim;
    const float* __restrict s = sin + i * head_dim;
    for (int h = 0; h < heads; ++h) {
      float* __restrict lo = x + i * stride_x + static_cast<int64_t>(h) * head_dim;
      float* __restrict hi = lo + half;
#pragma omp simd
      for (int j = 0; j < half; ++j) {
        const float a = lo[j], b = hi[j];
        lo[j] = a * c[j] - b * s[j];
        hi[j] = b * c[j + half] + a * s[j + half];
      }
    }
  }
}

}  // extern "C"

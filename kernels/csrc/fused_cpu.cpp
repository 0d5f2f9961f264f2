// Fused element-wise steps of a decoder layer on CPU, fp32 and bf16 (fused.h), each one pass
// over its rows instead of the 2-8 torch ops (and their dispatch) it replaces:
//   add_rms_norm: residual += x; out = weight * rms_norm(residual)      (x may be null)
//   silu_and_mul: out = silu(gate) * up, gate and up the two halves of each input row
//   rotary:       half-split RoPE of the heads of each row, in place, cos/sin per row
// Rows are spread over OpenMP threads (torch's libgomp, already loaded) when there are enough
// of them to pay for waking the threads.

#include <omp.h>

#include <cstdint>

#include "fused.h"

namespace {

constexpr int64_t kParallelElements = 1 << 14;  // below this, one thread (docs/cpu-kernels.md)

inline int threads_for(int64_t elements, int num_threads) {
  return elements >= kParallelElements ? num_threads : 1;
}

template <typename T>
void add_rms_norm(const T* x, int64_t stride_x, T* residual, int64_t stride_residual,
                  const T* weight, T* out, int64_t stride_out, int64_t rows, int64_t cols,
                  float eps, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads))
  for (int64_t i = 0; i < rows; ++i)
    pagedserve::add_rms_norm_row(x != nullptr ? x + i * stride_x : nullptr,
                                 residual + i * stride_residual, weight, out + i * stride_out,
                                 cols, eps);
}

template <typename T>
void silu_and_mul(const T* x, int64_t stride_x, T* out, int64_t stride_out, int64_t rows,
                  int64_t cols, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * cols, num_threads))
  for (int64_t i = 0; i < rows; ++i)
    pagedserve::silu_and_mul_row(x + i * stride_x, x + i * stride_x + cols, out + i * stride_out,
                                 cols);
}

// x: [rows, heads, head_dim] (head stride head_dim, row stride stride_x); cos, sin:
// [rows, head_dim] (row stride head_dim), the half-split layout (both halves equal).
template <typename T>
void rotary(T* x, int64_t stride_x, const T* cos, const T* sin, int64_t rows, int heads,
            int head_dim, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * heads * head_dim, num_threads))
  for (int64_t i = 0; i < rows; ++i)
    pagedserve::rotary_row(x + i * stride_x, cos + i * head_dim, sin + i * head_dim, heads,
                           head_dim);
}

}  // namespace

extern "C" {

#define PAGEDSERVE_FUSED(suffix, T)                                                          \
  void pagedserve_add_rms_norm_##suffix(const T* x, int64_t stride_x, T* residual,           \
                                        int64_t stride_residual, const T* weight, T* out,    \
                                        int64_t stride_out, int64_t rows, int64_t cols,      \
                                        float eps, int num_threads) {                        \
    add_rms_norm(x, stride_x, residual, stride_residual, weight, out, stride_out, rows, cols, \
                 eps, num_threads);                                                          \
  }                                                                                          \
  void pagedserve_silu_and_mul_##suffix(const T* x, int64_t stride_x, T* out,                \
                                        int64_t stride_out, int64_t rows, int64_t cols,      \
                                        int num_threads) {                                   \
    silu_and_mul(x, stride_x, out, stride_out, rows, cols, num_threads);                     \
  }                                                                                          \
  void pagedserve_rotary_##suffix(T* x, int64_t stride_x, const T* cos, const T* sin,        \
                                  int64_t rows, int heads, int head_dim, int num_threads) {  \
    rotary(x, stride_x, cos, sin, rows, heads, head_dim, num_threads);                       \
  }

PAGEDSERVE_FUSED(f32, float)
PAGEDSERVE_FUSED(bf16, pagedserve::bf16)

#undef PAGEDSERVE_FUSED

}  // extern "C"

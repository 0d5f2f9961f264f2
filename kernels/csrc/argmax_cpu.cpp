// Greedy sampling's argmax on CPU: for each row of logits (fp32 or bf16), the index of its
// first maximum, as torch's `max(dim=-1).indices` gives it, NaN included (a row holding a NaN
// answers its first NaN). One pass over each row, read in the logits' own dtype: a bf16
// model's logits are never widened into an fp32 copy first. Rows in parallel.
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "simd.h"

namespace {

using pagedserve::load16;
using pagedserve::v16;

typedef int32_t i16x32 __attribute__((vector_size(64)));  // 16 int32 lanes, v16's masks

constexpr int64_t kParallelElements = 1 << 14;  // below this, one thread

inline float load1(const float* p) { return *p; }
inline float load1(const pagedserve::bf16* p) { return pagedserve::bf16_to_f32(*p); }

template <typename T>
int64_t first_nan(const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = load1(x + j);
    if (v != v) return j;
  }
  return -1;
}

// Lanes keep their own running maximum with its first index (strict >, so earlier wins); the
// lanes then meet on the largest value and, among equals, the smallest index.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t j = 0, best_index = 0;
  float best = load1(x);
  bool nan = best != best;
  if (n >= 16) {
    v16 best_v = load16(x);
    i16x32 index{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    i16x32 best_i = index, unordered = best_v != best_v;
    for (j = 16; j + 16 <= n; j += 16) {
      const v16 v = load16(x + j);
      index += 16;
      const i16x32 greater = v > best_v;
      best_v = greater ? v : best_v;
      best_i = greater ? index : best_i;
      unordered |= v != v;
    }
    float lanes[16];
    int32_t lane_index[16], lane_nan[16];
    std::memcpy(lanes, &best_v, sizeof lanes);
    std::memcpy(lane_index, &best_i, sizeof lane_index);
    std::memcpy(lane_nan, &unordered, sizeof lane_nan);
    best = lanes[0];
    best_index = lane_index[0];
    for (int l = 0; l < 16; ++l) {
      nan = nan || lane_nan[l] != 0;
      if (lanes[l] > best || (lanes[l] == best && lane_index[l] < best_index)) {
        best = lanes[l];
        best_index = lane_index[l];
      }
    }
  }
  for (; j < n; ++j) {
    const float v = load1(x + j);
    nan = nan || v != v;
    if (v > best) {
      best = v;
      best_index = j;
    }
  }
  return nan ? first_nan(x, n) : best_index;
}

template <typename T>
void argmax_rows(const T* logits, int64_t stride, int64_t rows, int64_t cols, int64_t* out,
                 int num_threads) {
  const int threads = rows * cols >= kParallelElements ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < rows; ++i) out[i] = argmax_row(logits + i * stride, cols);
}

}  // namespace

extern "C" {

void pagedserve_argmax_f32(const float* logits, int64_t stride, int64_t rows, int64_t cols,
                           int64_t* out, int num_threads) {
  argmax_rows(logits, stride, rows, cols, out, num_threads);
}

void pagedserve_argmax_bf16(const pagedserve::bf16* logits, int64_t stride, int64_t rows,
                            int64_t cols, int64_t* out, int num_threads) {
  argmax_rows(logits, stride, rows, cols, out, num_threads);
}

}  // extern "C"

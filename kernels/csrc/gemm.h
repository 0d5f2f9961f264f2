// fp32 GEMM for few rows on CPU: out[M, N] = x[M, K] . W[N, K]^T (+ bias), W packed as
// [ceil(N / 16)][K][16] (16 output columns side by side per k), the layout `cpu_linear.pack`
// makes. Each thread takes whole 16-column blocks and streams their packed weights once,
// front to back, with a prefetch 2 KiB ahead (the hardware prefetchers alone left these
// few-row GEMMs at ~60% of the read bandwidth a GEMV reaches); rows go 8 at a time, so a block
// read for the first 8 rows is still in cache for the next. Used by gemm_cpu.cpp and
// decoder_cpu.cpp.

#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace pagedserve {
namespace gemm_detail {

constexpr int kPrefetchAhead = 32;  // k steps of 64 bytes
constexpr int kChunk = 64;          // k steps per partial sum
constexpr int kRowsPerPass = 8;     // accumulators: 2 x 8 registers (+ the weights)

template <int ROWS>
inline void block(const float* __restrict x, int64_t ldx, const float* __restrict w, int K,
           float* __restrict out, int64_t ldo, int cols, const float* bias) {
  // Two-level sums (kChunk k steps into `part`, then into `acc`): a single running sum over
  // 1536 products rounds ~5x worse than MKL's blocked GEMM.
  v16 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = v16{};
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int k1 = k0 + kChunk < K ? k0 + kChunk : K;
    v16 part[ROWS];
    for (int m = 0; m < ROWS; ++m) part[m] = v16{};
    for (int k = k0; k < k1; ++k) {
      __builtin_prefetch(w + static_cast<int64_t>(k + kPrefetchAhead) * 16, 0, 3);
      const v16 wk = load16(w + static_cast<int64_t>(k) * 16);
#pragma GCC unroll 8
      for (int m = 0; m < ROWS; ++m) part[m] += x[m * ldx + k] * wk;
    }
    for (int m = 0; m < ROWS; ++m) acc[m] += part[m];
  }
  for (int m = 0; m < ROWS; ++m) {
    float row[16];
    std::memcpy(row, &acc[m], sizeof row);
    float* o = out + m * ldo;
    for (int j = 0; j < cols; ++j) o[j] = bias != nullptr ? row[j] + bias[j] : row[j];
  }
}

inline void rows_block(int rows, const float* x, int64_t ldx, const float* w, int K, float* out,
                int64_t ldo, int cols, const float* bias) {
  switch (rows) {
#define PAGEDSERVE_ROWS(r) \
  case r: block<r>(x, ldx, w, K, out, ldo, cols, bias); break;
    PAGEDSERVE_ROWS(1) PAGEDSERVE_ROWS(2) PAGEDSERVE_ROWS(3) PAGEDSERVE_ROWS(4)
    PAGEDSERVE_ROWS(5) PAGEDSERVE_ROWS(6) PAGEDSERVE_ROWS(7) PAGEDSERVE_ROWS(8)
#undef PAGEDSERVE_ROWS
  }
}

}  // namespace gemm_detail

// out[rows, n] = x[rows, k] . W^T (+ bias), W packed [ceil(n / 16)][k][16]. The 16-column
// blocks are shared among the threads of the enclosing parallel region (an orphaned `omp for`,
// barrier at the end), so it runs inside a larger region as well as alone.
inline void gemm_packed_for(const float* x, int64_t ldx, const float* packed, const float* bias,
                            float* out, int64_t ldo, int64_t rows, int n, int k) {
  using gemm_detail::kRowsPerPass;
  const int num_blocks = (n + 15) / 16;
#pragma omp for schedule(static)
  for (int b = 0; b < num_blocks; ++b) {
    const int n0 = b * 16;
    const int cols = n - n0 < 16 ? n - n0 : 16;
    const float* w = packed + static_cast<int64_t>(b) * k * 16;
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass)
      gemm_detail::rows_block(
          rows - m0 < kRowsPerPass ? static_cast<int>(rows - m0) : kRowsPerPass, x + m0 * ldx,
          ldx, w, k, out + m0 * ldo + n0, ldo, cols, bias != nullptr ? bias + n0 : nullptr);
  }
}

}  // namespace pagedserve

// fp32 GEMM on CPU for the row counts of decode steps: out[M, N] = x[M, K] . W[N, K]^T (+ bias),
// W packed as [ceil(N / 16)][K][16] (16 output columns side by side per k), the layout
// `cpu_linear.pack` makes. Used by gemm_cpu.cpp and decoder_cpu.cpp.
//
// Work goes in tiles of up to 8 rows x 3 column blocks (24 accumulator registers; per k step
// 3 weight vectors and 8 broadcasts feed 24 FMAs). Each thread takes a contiguous run of
// 3-block groups; while it computes one group it prefetches the next group's weights into L2,
// and every pass prefetches its own weights 2 KiB ahead into L1, so the weight stream from DRAM
// overlaps the arithmetic instead of preceding it. Rows go 8 per pass over a group, the passes
// after the first reading the group from L2. Measured against the previous one-block tiles
// (same packing, 2 threads, weights streamed from DRAM): 1.2-1.3x at 1-8 rows (a 1-row GEMV
// reads ~30 GB/s, the machine's read bandwidth) and 1.4-1.6x at 16-64 rows.

#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace pagedserve {
namespace gemm_detail {

constexpr int kPrefetchAhead = 32;  // k steps of 64 bytes: 2 KiB
constexpr int kChunk = 64;          // k steps per partial sum
#if defined(__AVX512F__)
constexpr int kRowsPerPass = 8;  // 8 x 3 blocks: 24 of the 32 vector registers accumulate
constexpr int kBlocksPerTile = 3;
#else
// AVX2: a 16-float block is 2 of the 16 registers; 6 x 1 blocks accumulate in 12 of them.
// Measured on a Zen 2 at the SmolLM2-135M shapes, 64 rows: 6 x 1 158 GFLOP/s (74% of the FMA
// peak; MKL 97), 3 x 2 125, 4 x 2 113, 4 x 1 113 (docs/cpu-kernels.md).
constexpr int kRowsPerPass = 6;
constexpr int kBlocksPerTile = 1;
#endif

// ROWS rows x BLOCKS column blocks from column n0; `next` (may be null): a block of weights to
// pull into L2 during this pass, one 64-byte line per k step.
template <int ROWS, int BLOCKS>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int K,
                 float* __restrict out, int64_t ldo, int n0, int n, const float* bias,
                 const float* next) {
  const int64_t block_stride = static_cast<int64_t>(K) * 16;
  // A 16-float block is V native vectors (1 with AVX-512, 2 of 8 floats otherwise): a vector
  // type wider than the registers is kept in memory by the compiler.
  constexpr int V = 16 / kLanes;
  // Two-level sums (kChunk k steps into `part`, then into `acc`): a single running sum over
  // 1536 products rounds ~5x worse than MKL's blocked GEMM.
  vec acc[ROWS][BLOCKS * V];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < BLOCKS * V; ++c) acc[m][c] = vec{};
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int k1 = k0 + kChunk < K ? k0 + kChunk : K;
    vec part[ROWS][BLOCKS * V];
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS * V; ++c) part[m][c] = vec{};
    for (int k = k0; k < k1; ++k) {
      if (next != nullptr) __builtin_prefetch(next + static_cast<int64_t>(k) * 16, 0, 2);
      vec wk[BLOCKS * V];
      for (int c = 0; c < BLOCKS; ++c) {
        const float* wc = w + c * block_stride + static_cast<int64_t>(k) * 16;
        __builtin_prefetch(wc + kPrefetchAhead * 16, 0, 3);
        for (int v = 0; v < V; ++v) wk[c * V + v] = load_vec(wc + v * kLanes);
      }
#pragma GCC unroll 8
      for (int m = 0; m < ROWS; ++m) {
        const float xm = x[m * ldx + k];
        for (int c = 0; c < BLOCKS * V; ++c) part[m][c] += xm * wk[c];
      }
    }
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS * V; ++c) acc[m][c] += part[m][c];
  }
  for (int c = 0; c < BLOCKS; ++c) {
    const int col = n0 + 16 * c;
    const int cols = n - col < 16 ? n - col : 16;
    const float* b = bias != nullptr ? bias + col : nullptr;
    for (int m = 0; m < ROWS; ++m) {
      float row[16];
      std::memcpy(row, &acc[m][c * V], sizeof row);
      float* o = out + m * ldo + col;
      for (int j = 0; j < cols; ++j) o[j] = b != nullptr ? row[j] + b[j] : row[j];
    }
  }
}

template <int BLOCKS>
inline void rows_tile(int rows, const float* x, int64_t ldx, const float* w, int K, float* out,
                      int64_t ldo, int n0, int n, const float* bias, const float* next) {
  switch (rows) {
#define PAGEDSERVE_ROWS(r) \
  case r: tile<r, BLOCKS>(x, ldx, w, K, out, ldo, n0, n, bias, next); break;
    PAGEDSERVE_ROWS(1) PAGEDSERVE_ROWS(2) PAGEDSERVE_ROWS(3) PAGEDSERVE_ROWS(4)
    PAGEDSERVE_ROWS(5) PAGEDSERVE_ROWS(6) PAGEDSERVE_ROWS(7) PAGEDSERVE_ROWS(8)
#undef PAGEDSERVE_ROWS
  }
}

// This thread's contiguous share [lo, hi) of `count` items among the enclosing parallel
// region's threads (all of them for a team of one).
inline void thread_share(int count, int& lo, int& hi) {
  const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
  lo = static_cast<int>(static_cast<int64_t>(count) * thread / threads);
  hi = static_cast<int>(static_cast<int64_t>(count) * (thread + 1) / threads);
}

// The shared driver: every thread of the enclosing parallel region (or a team of one) takes a
// contiguous run of kBlocksPerTile-block groups and runs `rows_tile(blocks, r, x, w, out, n0,
// next)` over it, kRowsPerPass rows at a time, prefetching the next group's blocks (one per
// pass; more at once measured slower: the prefetches then compete with the pass's own loads).
// All meet at a barrier at the end, so it runs inside a larger region as well as alone.
// block_stride: elements of T per packed 16-column block.
template <typename T, typename RowsTile>
inline void gemm_groups_for(const T* x, int64_t ldx, const T* packed, T* out, int64_t ldo,
                            int64_t rows, int n, int64_t block_stride, RowsTile rows_tile) {
  const int num_blocks = (n + 15) / 16;
  int g_lo, g_hi;
  thread_share((num_blocks + kBlocksPerTile - 1) / kBlocksPerTile, g_lo, g_hi);
  const int passes = static_cast<int>((rows + kRowsPerPass - 1) / kRowsPerPass);
  for (int g = g_lo; g < g_hi; ++g) {
    const int b0 = g * kBlocksPerTile;
    const int blocks = num_blocks - b0 < kBlocksPerTile ? num_blocks - b0 : kBlocksPerTile;
    const T* w = packed + b0 * block_stride;
    for (int pass = 0; pass < passes; ++pass) {
      const T* next = g + 1 < g_hi && pass < kBlocksPerTile
                              && b0 + kBlocksPerTile + pass < num_blocks
                          ? w + (kBlocksPerTile + pass) * block_stride : nullptr;
      const int64_t m0 = static_cast<int64_t>(pass) * kRowsPerPass;
      const int r = rows - m0 < kRowsPerPass ? static_cast<int>(rows - m0) : kRowsPerPass;
      rows_tile(blocks, r, x + m0 * ldx, w, out + m0 * ldo, b0 * 16, next);
    }
  }
#pragma omp barrier
}

}  // namespace gemm_detail

// out[rows, n] = x[rows, k] . W^T (+ bias), W packed [ceil(n / 16)][k][16]. Called by every
// thread of the enclosing parallel region (or outside one: a team of one).
inline void gemm_packed_for(const float* x, int64_t ldx, const float* packed, const float* bias,
                            float* out, int64_t ldo, int64_t rows, int n, int k) {
  gemm_detail::gemm_groups_for(
      x, ldx, packed, out, ldo, rows, n, static_cast<int64_t>(k) * 16,
      [=](int blocks, int r, const float* xm, const float* w, float* om, int n0,
          const float* next) {
        switch (blocks) {
          case 3: gemm_detail::rows_tile<3>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next); break;
          case 2: gemm_detail::rows_tile<2>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next); break;
          default: gemm_detail::rows_tile<1>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next);
        }
      });
}

}  // namespace pagedserve

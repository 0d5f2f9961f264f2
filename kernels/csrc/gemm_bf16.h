// bf16 GEMM on CPU with fp32 accumulation: out[M, N] = x[M, K] . W[N, K]^T (+ bias), bf16 in and
// out (rounded to nearest even once, at the end, as torch's bf16 F.linear does), K even. W is
// packed as [ceil(N / 16)][K / 2][16][2]: per column block and pair of k steps, each column's
// two weights side by side in 32 bits, the layout `cpu_linear.pack` makes for bf16. With
// AVX512_BF16 one `vdpbf16ps` multiplies a pair for 16 columns; without it each pair is widened
// to two fp32 vectors (a shift and a mask) and FMAs do the rest, at the same tiles and through
// the same driver as the fp32 GEMM (gemm.h). Where the CPU has AMX-BF16 and K is a multiple of
// 32, gemm_amx.h runs it on AMX tiles instead, from the same packed copy.

#pragma once

#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "gemm.h"
#include "gemm_amx.h"
#include "simd.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace pagedserve {

namespace gemm_bf16_detail {

using gemm_detail::kChunk;
using gemm_detail::kPrefetchAhead;

// ROWS rows x BLOCKS column blocks from column n0 (see gemm.h's tile: two-level sums, the next
// group's weights pulled into L2 during the pass, its own 2 KiB ahead into L1).
template <int ROWS, int BLOCKS>
inline void tile(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w, int K,
                 uint16_t* __restrict out, int64_t ldo, int n0, int n, const uint16_t* bias,
                 const uint16_t* next) {
  const int64_t block_stride = static_cast<int64_t>(K) * 16;
  const int pairs = K / 2;
#if defined(__AVX512BF16__)
  __m512 acc[ROWS][BLOCKS];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < BLOCKS; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int p0 = 0; p0 < pairs; p0 += kChunk) {
    const int p1 = p0 + kChunk < pairs ? p0 + kChunk : pairs;
    __m512 part[ROWS][BLOCKS];
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS; ++c) part[m][c] = _mm512_setzero_ps();
    for (int p = p0; p < p1; ++p) {
      if (next != nullptr) __builtin_prefetch(next + static_cast<int64_t>(p) * 32, 0, 2);
      __m512bh wk[BLOCKS];
      for (int c = 0; c < BLOCKS; ++c) {
        const uint16_t* wc = w + c * block_stride + static_cast<int64_t>(p) * 32;
        __builtin_prefetch(wc + kPrefetchAhead * 32, 0, 3);
        wk[c] = (__m512bh)_mm512_loadu_si512(wc);
      }
#pragma GCC unroll 8
      for (int m = 0; m < ROWS; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * ldx + 2 * p, sizeof pair);
        const __m512bh xm = (__m512bh)_mm512_set1_epi32(pair);
        for (int c = 0; c < BLOCKS; ++c) part[m][c] = _mm512_dpbf16_ps(part[m][c], wk[c], xm);
      }
    }
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS; ++c) acc[m][c] = _mm512_add_ps(acc[m][c], part[m][c]);
  }
  constexpr int V = 1;
#else
  typedef uint32_t uvec __attribute__((vector_size(kLanes * 4)));
  constexpr int V = 16 / kLanes;  // native vectors per 16-column block
  vec acc[ROWS][BLOCKS * V];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < BLOCKS * V; ++c) acc[m][c] = vec{};
  for (int p0 = 0; p0 < pairs; p0 += kChunk) {
    const int p1 = p0 + kChunk < pairs ? p0 + kChunk : pairs;
    vec part[ROWS][BLOCKS * V];
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS * V; ++c) part[m][c] = vec{};
    for (int p = p0; p < p1; ++p) {
      if (next != nullptr) __builtin_prefetch(next + static_cast<int64_t>(p) * 32, 0, 2);
      vec even[BLOCKS * V], odd[BLOCKS * V];  // the pair's first and second k, as fp32
      for (int c = 0; c < BLOCKS; ++c) {
        const uint16_t* wc = w + c * block_stride + static_cast<int64_t>(p) * 32;
        __builtin_prefetch(wc + kPrefetchAhead * 32, 0, 3);
        for (int v = 0; v < V; ++v) {
          uvec u;
          std::memcpy(&u, wc + v * 2 * kLanes, sizeof u);
          const uvec lo = u << 16, hi = u & 0xffff0000u;
          std::memcpy(&even[c * V + v], &lo, sizeof lo);
          std::memcpy(&odd[c * V + v], &hi, sizeof hi);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < ROWS; ++m) {
        const float x0 = bf16_to_f32(x[m * ldx + 2 * p]);
        const float x1 = bf16_to_f32(x[m * ldx + 2 * p + 1]);
        for (int c = 0; c < BLOCKS * V; ++c) part[m][c] += x0 * even[c] + x1 * odd[c];
      }
    }
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < BLOCKS * V; ++c) acc[m][c] += part[m][c];
  }
#endif
  for (int c = 0; c < BLOCKS; ++c) {
    const int col = n0 + 16 * c;
    const int cols = n - col < 16 ? n - col : 16;
    for (int m = 0; m < ROWS; ++m) {
      float row[16];
      std::memcpy(row, &acc[m][c * V], sizeof row);
      uint16_t* o = out + m * ldo + col;
      for (int j = 0; j < cols; ++j)
        o[j] = f32_to_bf16(bias != nullptr ? row[j] + bf16_to_f32(bias[col + j]) : row[j]);
    }
  }
}

#if defined(__AVX512BF16__)
// One row: each block's weights read front to back, one block after the other, so a thread
// streams its share of W as one sequential run (the tile's three interleaved block streams
// read ~2/3 of the memory bandwidth on a Zen 4, docs/cpu-kernels.md); four partial sums per
// kChunk pairs keep the dot products' latency covered.
template <int BLOCKS>
inline void gemv(const uint16_t* __restrict x, const uint16_t* __restrict w, int K,
                 uint16_t* __restrict out, int n0, int n, const uint16_t* bias) {
  const int64_t block_stride = static_cast<int64_t>(K) * 16;
  const int pairs = K / 2;
  for (int c = 0; c < BLOCKS; ++c) {
    const uint16_t* wc = w + c * block_stride;
    __m512 acc = _mm512_setzero_ps();
    for (int p0 = 0; p0 < pairs; p0 += kChunk) {
      const int p1 = p0 + kChunk < pairs ? p0 + kChunk : pairs;
      __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps()};
      int p = p0;
      for (; p + 4 <= p1; p += 4) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          int32_t pair;
          std::memcpy(&pair, x + 2 * (p + j), sizeof pair);
          part[j] = _mm512_dpbf16_ps(
              part[j], (__m512bh)_mm512_loadu_si512(wc + static_cast<int64_t>(p + j) * 32),
              (__m512bh)_mm512_set1_epi32(pair));
        }
      }
      for (; p < p1; ++p) {
        int32_t pair;
        std::memcpy(&pair, x + 2 * p, sizeof pair);
        part[0] = _mm512_dpbf16_ps(part[0],
                                   (__m512bh)_mm512_loadu_si512(wc + static_cast<int64_t>(p) * 32),
                                   (__m512bh)_mm512_set1_epi32(pair));
      }
      acc = _mm512_add_ps(acc, _mm512_add_ps(_mm512_add_ps(part[0], part[1]),
                                             _mm512_add_ps(part[2], part[3])));
    }
    const int col = n0 + 16 * c;
    const int cols = n - col < 16 ? n - col : 16;
    float row[16];
    _mm512_storeu_ps(row, acc);
    for (int j = 0; j < cols; ++j)
      out[col + j] = f32_to_bf16(bias != nullptr ? row[j] + bf16_to_f32(bias[col + j]) : row[j]);
  }
}
#endif

template <int BLOCKS>
inline void rows_tile(int rows, const uint16_t* x, int64_t ldx, const uint16_t* w, int K,
                      uint16_t* out, int64_t ldo, int n0, int n, const uint16_t* bias,
                      const uint16_t* next) {
#if defined(__AVX512BF16__)
  if (rows == 1) {
    (void)next;
    gemv<BLOCKS>(x, w, K, out, n0, n, bias);
    return;
  }
#endif
  switch (rows) {
#define PAGEDSERVE_ROWS(r) \
  case r: tile<r, BLOCKS>(x, ldx, w, K, out, ldo, n0, n, bias, next); break;
    PAGEDSERVE_ROWS(1) PAGEDSERVE_ROWS(2) PAGEDSERVE_ROWS(3) PAGEDSERVE_ROWS(4)
    PAGEDSERVE_ROWS(5) PAGEDSERVE_ROWS(6) PAGEDSERVE_ROWS(7) PAGEDSERVE_ROWS(8)
#undef PAGEDSERVE_ROWS
  }
}

}  // namespace gemm_bf16_detail

// Whether gemm_packed_bf16_for can run on AMX tiles here (built with AMX-BF16, state granted).
inline bool amx_available() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return amx::available();
#else
  return false;
#endif
}

// out[rows, n] = x[rows, k] . W^T (+ bias) in bf16, W packed [ceil(n / 16)][k / 2][16][2], k
// even; on AMX tiles from amx_min_rows rows (where available and k % 32 == 0), else on the
// AVX512_BF16 (or scalar) tiles. Called by every thread of the enclosing parallel region (or a
// team of one).
inline void gemm_packed_bf16_for(const uint16_t* x, int64_t ldx, const uint16_t* packed,
                                 const uint16_t* bias, uint16_t* out, int64_t ldo,
                                 int64_t rows, int n, int k, int64_t amx_min_rows) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (rows >= amx_min_rows && k % 32 == 0 && amx::available()) {
    amx::gemm_for(x, ldx, packed, bias, out, ldo, rows, n, k);
    return;
  }
#endif
  namespace d = gemm_bf16_detail;
  gemm_detail::gemm_groups_for(
      x, ldx, packed, out, ldo, rows, n, static_cast<int64_t>(k) * 16,
      [=](int blocks, int r, const uint16_t* xm, const uint16_t* w, uint16_t* om, int n0,
          const uint16_t* next) {
        switch (blocks) {
          case 3: d::rows_tile<3>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next); break;
          case 2: d::rows_tile<2>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next); break;
          default: d::rows_tile<1>(r, xm, ldx, w, k, om, ldo, n0, n, bias, next);
        }
      });
}

}  // namespace pagedserve

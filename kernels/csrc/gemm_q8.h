// The 8-bit GEMM's core, for gemm_q8_cpu.cpp and decoder_cpu.cpp (what it computes and the
// packed layout: gemm_q8_cpu.cpp). quantize_rows_for and gemm_for run on the threads of the
// enclosing parallel region (or a team of one), each ending in a barrier.

#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define PAGEDSERVE_Q8_VNNI 1
#endif

namespace pagedserve {
namespace q8 {

constexpr int kBlock = 32;                   // values per scale
constexpr int kTileBytes = 512 + 32 + 32 + 32;  // values, fp16 scales, int16 sums, fp16 mins
constexpr int kTileBytes4 = 256 + 32 + 32 + 32;  // the same with 4-bit values, two a byte
constexpr int kRows = 4;                     // rows per pass

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mant;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Row m of x as unsigned bytes (q + 128) and, per block, its scale d and d x the sum of its
// q (what a block's offset m multiplies), side by side.
inline void quantize_row(const float* x, int k, uint8_t* q, float* scales) {
  for (int b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      float v = std::nearbyint(xb[i] * id);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      sum += static_cast<int>(v);
      q[b * kBlock + i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
    }
    scales[2 * b] = d;
    scales[2 * b + 1] = d * static_cast<float>(sum);
  }
}

struct Tile {
  const int8_t* values;    // [8][16][4]; 4-bit tiles [4][16][4], group j + 4 in the high nibbles
  const uint16_t* scales;  // [16] fp16
  const int16_t* sums;     // [16]
  const uint16_t* mins;    // [16] fp16: the block's offset (Q4_1), 0 for the others
};

inline Tile tile_at(const uint8_t* packed, int blocks_k, int nb, int b, bool four) {
  const int values = four ? 256 : 512;
  const uint8_t* t = packed + (static_cast<int64_t>(nb) * blocks_k + b) * (values + 96);
  return {reinterpret_cast<const int8_t*>(t), reinterpret_cast<const uint16_t*>(t + values),
          reinterpret_cast<const int16_t*>(t + values + 32),
          reinterpret_cast<const uint16_t*>(t + values + 64)};
}

// Value i of group j (k = 4 j + i) of column col in a tile's values.
inline int32_t tile_value(const Tile& t, bool four, int j, int col, int i) {
  if (!four) return t.values[j * 64 + col * 4 + i];
  const uint8_t byte = static_cast<uint8_t>(t.values[(j & 3) * 64 + col * 4 + i]);
  return j < 4 ? (byte & 0xF) : (byte >> 4);
}

inline void store_cols(float* out, const float* sums, const float* bias, int col, int n) {
  const int cols = n - col < 16 ? n - col : 16;
  for (int j = 0; j < cols; ++j) out[j] = bias != nullptr ? sums[j] + bias[col + j] : sums[j];
}

#if defined(PAGEDSERVE_Q8_VNNI)

// ROWS rows x up to 2 column blocks (nb, nb + 1 when `two`); FOUR: 4-bit tiles.
template <int ROWS, bool FOUR>
inline void pass(const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds, const uint8_t* packed,
          int k, int nb, bool two, const float* bias, float* out, int64_t ldo, int n) {
  const int blocks_k = k / kBlock;
  const int C = two ? 2 : 1;
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int b = 0; b < blocks_k; ++b) {
    Tile t[2] = {tile_at(packed, blocks_k, nb, b, FOUR),
                 tile_at(packed, blocks_k, nb + (two ? 1 : 0), b, FOUR)};
    __m512i dot[ROWS][2];
    for (int r = 0; r < ROWS; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    if constexpr (FOUR) {
      const __m512i mask = _mm512_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        const __m512i v0 = _mm512_loadu_si512(t[0].values + j * 64);
        const __m512i v1 = _mm512_loadu_si512(t[1].values + j * 64);
        const __m512i lo0 = _mm512_and_si512(v0, mask);
        const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), mask);
        const __m512i lo1 = _mm512_and_si512(v1, mask);
        const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), mask);
        for (int r = 0; r < ROWS; ++r) {
          int32_t four_lo, four_hi;
          std::memcpy(&four_lo, xq + r * ldq + b * kBlock + 4 * j, sizeof four_lo);
          std::memcpy(&four_hi, xq + r * ldq + b * kBlock + 16 + 4 * j, sizeof four_hi);
          const __m512i xlo = _mm512_set1_epi32(four_lo), xhi = _mm512_set1_epi32(four_hi);
          dot[r][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[r][0], xlo, lo0), xhi, hi0);
          if (two)
            dot[r][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[r][1], xlo, lo1), xhi, hi1);
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const __m512i w0 = _mm512_loadu_si512(t[0].values + j * 64);
        const __m512i w1 = _mm512_loadu_si512(t[1].values + j * 64);
        for (int r = 0; r < ROWS; ++r) {
          int32_t four;
          std::memcpy(&four, xq + r * ldq + b * kBlock + 4 * j, sizeof four);
          const __m512i xb = _mm512_set1_epi32(four);
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], xb, w0);
          if (two) dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], xb, w1);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 dw = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t[c].scales)));
      const __m512i offset = _mm512_slli_epi32(
          _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t[c].sums))),
          7);
      const __m512 mins = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t[c].mins)));
      for (int r = 0; r < ROWS; ++r) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r][c], offset));
        acc[r][c] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(xs[r * lds + 2 * b])),
                                    acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xs[r * lds + 2 * b + 1]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, acc[r][c]);
      store_cols(out + r * ldo + (nb + c) * 16, sums, bias, (nb + c) * 16, n);
    }
}

template <bool FOUR>
inline void rows_pass_of(int rows, const uint8_t* xq, int64_t ldq, const float* xs,
                         int64_t lds, const uint8_t* packed, int k, int nb, bool two,
                         const float* bias, float* out, int64_t ldo, int n) {
  switch (rows) {
    case 1: pass<1, FOUR>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    case 2: pass<2, FOUR>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    case 3: pass<3, FOUR>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    default: pass<4, FOUR>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n);
  }
}

inline void rows_pass(int rows, const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds,
               const uint8_t* packed, int k, int nb, bool two, const float* bias, float* out,
               int64_t ldo, int n, bool four) {
  if (four)
    rows_pass_of<true>(rows, xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n);
  else
    rows_pass_of<false>(rows, xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n);
}

#else  // the fallback: the same sums in plain loops

inline void rows_pass(int rows, const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds,
               const uint8_t* packed, int k, int nb, bool two, const float* bias, float* out,
               int64_t ldo, int n, bool four) {
  const int blocks_k = k / kBlock;
  for (int c = 0; c < (two ? 2 : 1); ++c) {
    for (int r = 0; r < rows; ++r) {
      float acc[16] = {};
      for (int b = 0; b < blocks_k; ++b) {
        const Tile t = tile_at(packed, blocks_k, nb + c, b, four);
        int32_t dot[16] = {};
        for (int j = 0; j < 8; ++j)
          for (int col = 0; col < 16; ++col)
            for (int i = 0; i < 4; ++i)
              dot[col] += static_cast<int32_t>(xq[r * ldq + b * kBlock + 4 * j + i]) *
                          tile_value(t, four, j, col, i);
        for (int col = 0; col < 16; ++col) {
          acc[col] += static_cast<float>(dot[col] - 128 * t.sums[col]) *
                      (half_to_float(t.scales[col]) * xs[r * lds + 2 * b]);
          acc[col] += half_to_float(t.mins[col]) * xs[r * lds + 2 * b + 1];
        }
      }
      store_cols(out + r * ldo + (nb + c) * 16, acc, bias, (nb + c) * 16, n);
    }
  }
}

#endif


// Rows of x as unsigned bytes xq [rows, k] and their block scales xs [rows, 2 k / 32].
inline void quantize_rows_for(const float* x, int64_t ldx, int64_t rows, int k, uint8_t* xq,
                              float* xs) {
#pragma omp for schedule(static)
  for (int64_t m = 0; m < rows; ++m)
    quantize_row(x + m * ldx, k, xq + m * k, xs + m * (2 * k / kBlock));
}

// out[rows, n] (+ bias) from quantize_rows_for's xq, xs and 8-bit (or, `four`, 4-bit) tiles:
// threads take contiguous runs of column-block pairs, all rows for each.
inline void gemm_for(const uint8_t* xq, const float* xs, const uint8_t* packed,
                     const float* bias, float* out, int64_t ldo, int64_t rows, int n, int k,
                     bool four) {
  const int blocks_k = k / kBlock;
  const int n_blocks = (n + 15) / 16;
  const int pairs = (n_blocks + 1) / 2;
  const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
  const int lo = static_cast<int>(static_cast<int64_t>(pairs) * thread / threads);
  const int hi = static_cast<int>(static_cast<int64_t>(pairs) * (thread + 1) / threads);
  for (int p = lo; p < hi; ++p) {
    const int nb = 2 * p;
    const bool two = nb + 1 < n_blocks;
    for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
      const int r = rows - m0 < kRows ? static_cast<int>(rows - m0) : kRows;
      rows_pass(r, xq + m0 * k, k, xs + m0 * 2 * blocks_k, 2 * blocks_k, packed, k, nb, two,
                bias, out + m0 * ldo, ldo, n, four);
    }
  }
#pragma omp barrier
}

}  // namespace q8
}  // namespace pagedserve

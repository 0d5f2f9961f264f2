// GEMM with 8-bit weights on CPU: out[M, N] = x[M, K] . W[N, K]^T (+ bias), fp32 activations
// and output, W in blocks of 32 values along K with one scale each (GGUF's Q8_0, and the
// `--quantization int8` of a float checkpoint). Never dequantizes W: the activations are
// quantized on the fly, per row and block of 32, to int8 with their own scale (d = max|x| /
// 127, q = round-to-nearest-even(x / d)), and each block's dot product is exact int32 arithmetic
// before its two scales apply in fp32.
//
// Packed layout (`cpu_quant.pack_q8_0`): [ceil(N / 16)][K / 32] tiles of 576 bytes, each
// 16 output columns x one block: the int8 values as [8][16][4] (for each group of 4 k, the 16
// columns' 4 values side by side: one 64-byte vector), then the 16 columns' scales (fp16), then
// the 16 columns' sums of their 32 values (int16).
//
// With AVX512-VNNI, `vpdpbusd` multiplies 64 unsigned by 64 signed bytes into 16 int32 sums:
// the activations go in as q + 128 (unsigned), and 128 x the column's value sum comes off
// again. Elsewhere the same arithmetic runs as plain loops (the fallback). Threads take
// contiguous runs of 16-column blocks; the activations are quantized once per call.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define PAGEDSERVE_Q8_VNNI 1
#endif

namespace {

constexpr int kBlock = 32;                   // values per scale
constexpr int kTileBytes = 512 + 32 + 32;    // values, fp16 scales, int16 sums
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

// Row m of x as unsigned bytes (q + 128) and its per-block scales.
void quantize_row(const float* x, int k, uint8_t* q, float* scales) {
  for (int b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    scales[b] = d;
    for (int i = 0; i < kBlock; ++i) {
      float v = std::nearbyint(xb[i] * id);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      q[b * kBlock + i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
    }
  }
}

struct Tile {
  const int8_t* values;    // [8][16][4]
  const uint16_t* scales;  // [16] fp16
  const int16_t* sums;     // [16]
};

inline Tile tile_at(const uint8_t* packed, int blocks_k, int nb, int b) {
  const uint8_t* t = packed + (static_cast<int64_t>(nb) * blocks_k + b) * kTileBytes;
  return {reinterpret_cast<const int8_t*>(t), reinterpret_cast<const uint16_t*>(t + 512),
          reinterpret_cast<const int16_t*>(t + 544)};
}

inline void store_cols(float* out, const float* sums, const float* bias, int col, int n) {
  const int cols = n - col < 16 ? n - col : 16;
  for (int j = 0; j < cols; ++j) out[j] = bias != nullptr ? sums[j] + bias[col + j] : sums[j];
}

#if defined(PAGEDSERVE_Q8_VNNI)

// ROWS rows x up to 2 column blocks (nb, nb + 1 when `two`).
template <int ROWS>
void pass(const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds, const uint8_t* packed,
          int k, int nb, bool two, const float* bias, float* out, int64_t ldo, int n) {
  const int blocks_k = k / kBlock;
  const int C = two ? 2 : 1;
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int b = 0; b < blocks_k; ++b) {
    Tile t[2] = {tile_at(packed, blocks_k, nb, b), tile_at(packed, blocks_k, nb + (two ? 1 : 0), b)};
    __m512i dot[ROWS][2];
    for (int r = 0; r < ROWS; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
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
    for (int c = 0; c < C; ++c) {
      const __m512 dw = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t[c].scales)));
      const __m512i offset = _mm512_slli_epi32(
          _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t[c].sums))),
          7);
      for (int r = 0; r < ROWS; ++r) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r][c], offset));
        acc[r][c] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(xs[r * lds + b])),
                                    acc[r][c]);
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

void rows_pass(int rows, const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds,
               const uint8_t* packed, int k, int nb, bool two, const float* bias, float* out,
               int64_t ldo, int n) {
  switch (rows) {
    case 1: pass<1>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    case 2: pass<2>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    case 3: pass<3>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n); break;
    default: pass<4>(xq, ldq, xs, lds, packed, k, nb, two, bias, out, ldo, n);
  }
}

#else  // the fallback: the same sums in plain loops

void rows_pass(int rows, const uint8_t* xq, int64_t ldq, const float* xs, int64_t lds,
               const uint8_t* packed, int k, int nb, bool two, const float* bias, float* out,
               int64_t ldo, int n) {
  const int blocks_k = k / kBlock;
  for (int c = 0; c < (two ? 2 : 1); ++c) {
    for (int r = 0; r < rows; ++r) {
      float acc[16] = {};
      for (int b = 0; b < blocks_k; ++b) {
        const Tile t = tile_at(packed, blocks_k, nb + c, b);
        int32_t dot[16] = {};
        for (int j = 0; j < 8; ++j)
          for (int col = 0; col < 16; ++col)
            for (int i = 0; i < 4; ++i)
              dot[col] += static_cast<int32_t>(xq[r * ldq + b * kBlock + 4 * j + i]) *
                          t.values[j * 64 + col * 4 + i];
        for (int col = 0; col < 16; ++col)
          acc[col] += static_cast<float>(dot[col] - 128 * t.sums[col]) *
                      (half_to_float(t.scales[col]) * xs[r * lds + b]);
      }
      store_cols(out + r * ldo + (nb + c) * 16, acc, bias, (nb + c) * 16, n);
    }
  }
}

#endif

}  // namespace

extern "C" {

void pagedserve_gemm_q8_0_f32(const float* x, int64_t ldx, const uint8_t* packed,
                              const float* bias, float* out, int64_t ldo, int64_t rows, int n,
                              int k, int num_threads) {
  const int blocks_k = k / kBlock;
  std::vector<uint8_t> xq(static_cast<size_t>(rows) * k);
  std::vector<float> xs(static_cast<size_t>(rows) * blocks_k);
  const int n_blocks = (n + 15) / 16;
  const int pairs = (n_blocks + 1) / 2;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < rows; ++m)
      quantize_row(x + m * ldx, k, xq.data() + m * k, xs.data() + m * blocks_k);
    const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int lo = static_cast<int>(static_cast<int64_t>(pairs) * thread / threads);
    const int hi = static_cast<int>(static_cast<int64_t>(pairs) * (thread + 1) / threads);
    for (int p = lo; p < hi; ++p) {
      const int nb = 2 * p;
      const bool two = nb + 1 < n_blocks;
      for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
        const int r = rows - m0 < kRows ? static_cast<int>(rows - m0) : kRows;
        rows_pass(r, xq.data() + m0 * k, k, xs.data() + m0 * blocks_k, blocks_k, packed, k,
                  nb, two, bias, out + m0 * ldo, ldo, n);
      }
    }
  }
}

int pagedserve_gemm_q8_0_vnni() {
#if defined(PAGEDSERVE_Q8_VNNI)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"

// GEMM with 8-bit weights on CPU: out[M, N] = x[M, K] . W[N, K]^T (+ bias), fp32 activations
// and output, W in blocks of 32 values along K, each value d * q + m with an int8 q and one
// scale d and offset m per block (m = 0 for GGUF's Q8_0 and Q4_0 and for `--quantization int8`;
// Q4_1's offset otherwise). Never dequantizes W: the activations are quantized on the fly, per
// row and block of 32, to int8 with their own scale (d_x = max|x| / 127, q_x =
// round-to-nearest-even(x / d_x)), each block's dot product is exact int32 arithmetic, then
// d * d_x scales it and m * d_x * sum(q_x) adds the offset's share, in fp32.
//
// Packed layout (`cpu_quant.pack_blocks`): [ceil(N / 16)][K / 32] tiles of 608 bytes, each
// 16 output columns x one block: the int8 values as [8][16][4] (for each group of 4 k, the 16
// columns' 4 values side by side: one 64-byte vector), then the 16 columns' scales (fp16), the
// 16 columns' sums of their 32 values (int16), and their offsets (fp16). 4-bit tiles (`four`,
// every value in 0..15: GGUF's 4-bit types) are 352 bytes: groups j and j + 4 share a vector,
// j in the low and j + 4 in the high nibbles ([4][16][4]), unpacked in registers with a mask
// and a shift; then the same scales, sums and offsets.
//
// With AVX512-VNNI, `vpdpbusd` multiplies 64 unsigned by 64 signed bytes into 16 int32 sums:
// the activations go in as q + 128 (unsigned), and 128 x the column's value sum comes off
// again. Elsewhere the same arithmetic runs as plain loops (the fallback). Threads take
// contiguous runs of 16-column blocks; the activations are quantized once per call.

#include <omp.h>

#include <cstdint>
#include <vector>

#include "gemm_q8.h"

extern "C" {

void pagedserve_gemm_q8_0_f32(const float* x, int64_t ldx, const uint8_t* packed,
                              const float* bias, float* out, int64_t ldo, int64_t rows, int n,
                              int k, int four, int num_threads) {
  std::vector<uint8_t> xq(static_cast<size_t>(rows) * k);
  std::vector<float> xs(static_cast<size_t>(rows) * 2 * (k / pagedserve::q8::kBlock));
#pragma omp parallel num_threads(num_threads)
  {
    pagedserve::q8::quantize_rows_for(x, ldx, rows, k, xq.data(), xs.data());
    pagedserve::q8::gemm_for(xq.data(), xs.data(), packed, bias, out, ldo, rows, n, k,
                             four != 0);
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

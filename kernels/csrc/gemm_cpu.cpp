// GEMMs for few rows on CPU as calls of their own: out[M, N] = x[M, K] . W^T (+ bias), fp32
// (gemm.h, W packed [ceil(N / 16)][K][16]) and bf16 (gemm_bf16.h, [ceil(N / 16)][K / 2][16][2]),
// by `cpu_linear.pack`.

#include <omp.h>

#include <cstdint>

#include "gemm.h"
#include "gemm_bf16.h"

extern "C" {

void pagedserve_gemm_packed_f32(const float* x, int64_t ldx, const float* packed,
                                const float* bias, float* out, int64_t ldo, int64_t rows,
                                int n, int k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  pagedserve::gemm_packed_for(x, ldx, packed, bias, out, ldo, rows, n, k);
}

void pagedserve_gemm_packed_bf16(const uint16_t* x, int64_t ldx, const uint16_t* packed,
                                 const uint16_t* bias, uint16_t* out, int64_t ldo, int64_t rows,
                                 int n, int k, int64_t amx_min_rows, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  pagedserve::gemm_packed_bf16_for(x, ldx, packed, bias, out, ldo, rows, n, k, amx_min_rows);
}

int pagedserve_gemm_amx_available() { return pagedserve::amx_available() ? 1 : 0; }

}  // extern "C"

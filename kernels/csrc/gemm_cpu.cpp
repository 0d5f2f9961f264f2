// fp32 GEMM for few rows on CPU (gemm.h), as a call of its own: out[M, N] = x[M, K] . W^T
// (+ bias), W packed [ceil(N / 16)][K][16] by `cpu_linear.pack`.

#include <omp.h>

#include <cstdint>

#include "gemm.h"

extern "C" {

void pagedserve_gemm_packed_f32(const float* x, int64_t ldx, const float* packed,
                                const float* bias, float* out, int64_t ldo, int64_t rows,
                                int n, int k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  pagedserve::gemm_packed_for(x, ldx, packed, bias, out, ldo, rows, n, k);
}

}  // extern "C"

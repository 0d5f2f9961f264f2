// The CPU's FLOP peaks: every thread runs independent chains of vector multiply-adds on
// registers (enough chains to cover the latency on every port), with no memory traffic.
//   fp32: FMAs on the widest vector the build targets, 16 floats with AVX-512, else 8;
//   bf16: AVX512_BF16 dot products (vdpbf16ps: per fp32 lane, two bf16 products added), what
//         the bf16 GEMM tiles' inner loop runs; 0 FLOPs where the build has no AVX512_BF16.
#include <omp.h>

#include <cstdint>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;
#else
typedef float vec __attribute__((vector_size(32)));
constexpr int kLanes = 8;
#endif
constexpr int kChains = 12;  // > latency (4-5 cycles) x FMA ports (2)

// Runs `iters` steps of kChains FMAs per thread on `threads` threads; returns the FLOPs done.
// `sink` receives a value that depends on every chain, so none is optimised away.
extern "C" double pagedserve_fma_peak_f32(int64_t iters, int threads, float* sink) {
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    vec acc[kChains];
    vec mul, add;
    for (int j = 0; j < kLanes; ++j) {
      mul[j] = 0.999999f;
      add[j] = 1e-7f * static_cast<float>(omp_get_thread_num() + 1);
    }
    for (int c = 0; c < kChains; ++c)
      for (int j = 0; j < kLanes; ++j) acc[c][j] = static_cast<float>(c + j);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;
    }
    float s = 0.0f;
    for (int c = 0; c < kChains; ++c)
      for (int j = 0; j < kLanes; ++j) s += acc[c][j];
#pragma omp critical
    *sink += s;
    total += 2.0 * kChains * kLanes * static_cast<double>(iters);
  }
  return total;
}

// As pagedserve_fma_peak_f32, with kBf16Chains vdpbf16ps chains of 16 lanes (64 FLOPs each).
constexpr int kBf16Chains = 16;  // > latency (~6 cycles) x ports (2)

extern "C" double pagedserve_dot_peak_bf16(int64_t iters, int threads, float* sink) {
#if defined(__AVX512BF16__)
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m512 acc[kBf16Chains];
    // Products of 1.0 and ~1e-7 per lane: the sums stay small and normal however long it runs.
    const __m512bh one = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80));
    const __m512bh tiny = reinterpret_cast<__m512bh>(
        _mm512_set1_epi16(static_cast<short>(0x33d6 + omp_get_thread_num())));
    for (int c = 0; c < kBf16Chains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
      for (int c = 0; c < kBf16Chains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], one, tiny);
    }
    float s = 0.0f;
    for (int c = 0; c < kBf16Chains; ++c) s += _mm512_reduce_add_ps(acc[c]);
#pragma omp critical
    *sink += s;
    total += 64.0 * kBf16Chains * static_cast<double>(iters);
  }
  return total;
#else
  (void)iters;
  (void)threads;
  *sink = 0.0f;
  return 0.0;
#endif
}

// The CPU's fp32 FMA peak: every thread runs independent chains of vector FMAs on registers
// (enough chains to cover the FMA latency on every FMA port), with no memory traffic. The
// widest vector the build targets: 16 floats with AVX-512, else 8.
#include <omp.h>

#include <cstdint>

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

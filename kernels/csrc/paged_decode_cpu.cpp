// Decode attention over the paged KV cache on CPU, fp32 or bf16: one query token per sequence,
// read straight through the block table (no gathered copy of K and V).
//
// paged_decode.h `attend_all_for` in a parallel region of its own. torch's libgomp is the one
// already loaded, so this shares torch's thread pool.

#include <omp.h>

#include <cstdint>
#include <vector>

#include "paged_decode.h"

namespace {

using pagedserve::Args;

template <int HEAD_DIM, typename T>
void run(const Args<T>& a, int64_t num_decodes, int head_dim, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch;
    pagedserve::attend_all_for<HEAD_DIM>(a, num_decodes, head_dim, scratch);
  }
}

// Returns 0, or -1 for a head layout it cannot run.
template <typename T>
int paged_decode(const T* query, int64_t stride_query, T* out, int64_t stride_out,
                 const T* key_cache, const T* value_cache, int64_t stride_block,
                 int64_t stride_slot, const int32_t* block_table, int64_t stride_table,
                 const int32_t* seq_lens, const int64_t* rows, const int64_t* seqs,
                 int64_t num_decodes, int num_heads, int num_kv_heads, int head_dim,
                 int block_size, float scale, int sliding_window, int num_threads) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0)
    return -1;
  const Args<T> a{query, stride_query, out, stride_out, key_cache, value_cache, stride_block,
                  stride_slot, block_table, stride_table, seq_lens, rows, seqs, num_heads,
                  num_kv_heads, block_size, scale, sliding_window};
  switch (head_dim) {
    case 64: run<64>(a, num_decodes, head_dim, num_threads); break;
    case 128: run<128>(a, num_decodes, head_dim, num_threads); break;
    case 32: run<32>(a, num_decodes, head_dim, num_threads); break;
    case 96: run<96>(a, num_decodes, head_dim, num_threads); break;
    case 256: run<256>(a, num_decodes, head_dim, num_threads); break;
    default: run<0>(a, num_decodes, head_dim, num_threads); break;
  }
  return 0;
}

}  // namespace

extern "C" {

#define PAGEDSERVE_PAGED_DECODE(suffix, T)                                                   \
  int pagedserve_paged_decode_##suffix(                                                      \
      const T* query, int64_t stride_query, T* out, int64_t stride_out, const T* key_cache,  \
      const T* value_cache, int64_t stride_block, int64_t stride_slot,                       \
      const int32_t* block_table, int64_t stride_table, const int32_t* seq_lens,             \
      const int64_t* rows, const int64_t* seqs, int64_t num_decodes, int num_heads,          \
      int num_kv_heads, int head_dim, int block_size, float scale, int sliding_window,       \
      int num_threads) {                                                                     \
    return paged_decode(query, stride_query, out, stride_out, key_cache, value_cache,        \
                        stride_block, stride_slot, block_table, stride_table, seq_lens,      \
                        rows, seqs, num_decodes, num_heads, num_kv_heads, head_dim,          \
                        block_size, scale, sliding_window, num_threads);                     \
  }

PAGEDSERVE_PAGED_DECODE(f32, float)
PAGEDSERVE_PAGED_DECODE(bf16, pagedserve::bf16)

#undef PAGEDSERVE_PAGED_DECODE

}  // extern "C"

// Decode attention of one query token over its sequence's paged K/V, for a range of kv heads
// (`attend`): scores 16 tokens per vector where head_dim allows (pass 1), softmax in place,
// then the value sum (pass 2); K and V are each read once, in place through the block table.
// Query, cache and output are all fp32 or all bf16 (T); the sums are fp32 either way, and a
// bf16 output is rounded once. Used by paged_decode_cpu.cpp and decoder_cpu.cpp.
//
// Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], the last dim contiguous.

#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "simd.h"

namespace pagedserve {

#define SHUFFLE __builtin_shufflevector  // gcc >= 12, clang

// Lane j of the result is the sum of p[j]'s 16 lanes: 16 horizontal sums in 15 adds and 31
// shuffles (halving the lanes per vector at each of 4 levels, two vectors at a time), instead of
// a reduction tree per vector. The levels leave lane j holding vector bitreverse4(j)'s sum.
inline v16 sum_each(v16 p[16]) {
  v16 r8[8], r4[4], r2[2];
  for (int i = 0; i < 8; ++i)
    r8[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                    23)
            + SHUFFLE(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                      29, 30, 31);
  for (int i = 0; i < 4; ++i)
    r4[i] = SHUFFLE(r8[2 * i], r8[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                    26, 27)
            + SHUFFLE(r8[2 * i], r8[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28,
                      29, 30, 31);
  for (int i = 0; i < 2; ++i)
    r2[i] = SHUFFLE(r4[2 * i], r4[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13,
                    28, 29)
            + SHUFFLE(r4[2 * i], r4[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14,
                      15, 30, 31);
  const v16 r = SHUFFLE(r2[0], r2[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
                + SHUFFLE(r2[0], r2[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15,
                          31);
  return SHUFFLE(r, r, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// The next block's rows that a task will read, prefetched a few lines at a time while it
// works on the current block: the hardware prefetchers alone start over at every block and
// left the kernel reading DRAM at ~13 GB/s where a plain loop over the same blocks reads ~20.
struct BlockPrefetch {
  const char* row = nullptr;  // the next line's row (token) at the task's first kv head
  int64_t stride_slot = 0;    // bytes
  int row_lines = 0, col = 0, lines_left = 0;

  template <typename T>
  void start(const T* block, int64_t stride, int row_elements, int rows) {
    row = reinterpret_cast<const char*>(block);
    stride_slot = stride * static_cast<int64_t>(sizeof(T));
    row_lines = (row_elements * static_cast<int>(sizeof(T)) + 63) / 64;
    lines_left = rows * row_lines;
    col = 0;
  }
  // The next `count` lines, row by row (counters, not a division per line: that cost more
  // than the prefetches).
  void step(int count) {
    for (int c = 0; c < count && lines_left > 0; ++c, --lines_left) {
      __builtin_prefetch(row + col * 64, 0, 2);
      if (++col == row_lines) {
        col = 0;
        row += stride_slot;
      }
    }
  }
};

// scores[h * n + j] = scale * q_h . k_j for `count` (<= 16) consecutive token rows k_j (row
// stride `stride_slot`, kv head h / G at offset (h / G) * D); D a multiple of 16; q in fp32.
template <typename T>
inline void score_16_tokens(const T* k, int64_t stride_slot, int count, const float* q, int nh,
                            int G, int D, float scale, float* scores, int n,
                            BlockPrefetch& prefetch) {
  for (int h = 0; h < nh; ++h) {
    const float* __restrict qh = q + h * D;
    const int64_t kv = static_cast<int64_t>(h / G) * D;
    v16 part[16];
    for (int j = 0; j < count; ++j) {
      const T* __restrict kj = k + j * stride_slot + kv;
      v16 acc = load16(qh) * load16(kj);
      for (int c = 16; c < D; c += 16) acc += load16(qh + c) * load16(kj + c);
      part[j] = acc;
      prefetch.step(2);
    }
    for (int j = count; j < 16; ++j) part[j] = v16{};
    const v16 s = sum_each(part) * scale;
    std::memcpy(scores + static_cast<size_t>(h) * n, &s, sizeof(float) * count);
  }
}

// acc[0, D) += p * v[0, D)
inline void add_scaled(float* __restrict acc, float p, const float* __restrict v, int D) {
#pragma omp simd
  for (int d = 0; d < D; ++d) acc[d] += p * v[d];
}

inline void add_scaled(float* __restrict acc, float p, const bf16* __restrict v, int D) {
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    const v16 sum = load16(acc + d) + p * load16(v + d);
    std::memcpy(acc + d, &sum, sizeof sum);
  }
  for (; d < D; ++d) acc[d] += p * to_f32(v[d]);
}

template <typename T>
struct Args {
  const T* query;  // [num_tokens, num_heads, head_dim]
  int64_t stride_query;
  T* out;  // [num_tokens, num_heads, head_dim]
  int64_t stride_out;
  const T* key_cache;
  const T* value_cache;
  int64_t stride_block;  // elements between blocks (same for K and V)
  int64_t stride_slot;   // elements between the tokens of a block
  const int32_t* block_table;  // [num_seqs, max_blocks]
  int64_t stride_table;
  const int32_t* seq_lens;  // [num_seqs]
  const int64_t* rows;      // [num_decodes] query row of each decode
  const int64_t* seqs;      // [num_decodes] sequence (block_table row) of each decode
  int num_heads, num_kv_heads, block_size;
  float scale;
  int sliding_window;  // 0: none
};

// One task: decode `decode`, kv heads [kv_lo, kv_hi). Tokens are the outer loop, so a block's
// rows (all kv heads of a token side by side) are read front to back.
// HEAD_DIM > 0: the head size as a compile-time constant; 0: `head_dim` at run time.
template <int HEAD_DIM, typename T>
inline void attend(const Args<T>& a, int64_t decode, int kv_lo, int kv_hi, int head_dim,
                   std::vector<float>& scratch) {
  const int D = HEAD_DIM > 0 ? HEAD_DIM : head_dim;
  const int G = a.num_heads / a.num_kv_heads;
  const int nh = (kv_hi - kv_lo) * G;  // query heads of this task
  const int64_t seq = a.seqs[decode];
  const int seq_len = a.seq_lens[seq];
  const int first = a.sliding_window > 0 && seq_len > a.sliding_window
                        ? seq_len - a.sliding_window : 0;
  const int n = seq_len - first;
  if (n <= 0) return;
  scratch.resize(static_cast<size_t>(nh) * n + 2 * static_cast<size_t>(nh) * D + nh);
  float* __restrict scores = scratch.data();  // [nh, n]
  float* __restrict acc = scores + static_cast<size_t>(nh) * n;  // [nh, D]
  float* __restrict q = acc + static_cast<size_t>(nh) * D;       // [nh, D] the query, fp32
  float* __restrict inv_sum = q + static_cast<size_t>(nh) * D;   // [nh]
  const int64_t head_offset = static_cast<int64_t>(kv_lo) * D;
  const T* query = a.query + a.rows[decode] * a.stride_query + head_offset * G;
  for (int i = 0; i < nh * D; ++i) q[i] = to_f32(query[i]);
  const int32_t* table = a.block_table + seq * a.stride_table;

  const int row_elements = (kv_hi - kv_lo) * D;
  const int t_first = first - first % a.block_size;
  const int last_block = (seq_len - 1) / a.block_size;
  BlockPrefetch prefetch;
  // Pass 1: scores[h, t] = scale * q_h . k_t (query head h reads kv head h / G)
  for (int t0 = t_first; t0 < seq_len; t0 += a.block_size) {
    const int b = t0 / a.block_size;
    const int64_t base = table[b] * a.stride_block + head_offset;
    const int lo = t0 < first ? first : t0;
    const int hi = t0 + a.block_size < seq_len ? t0 + a.block_size : seq_len;
    const int64_t next = b < last_block ? table[b + 1] * a.stride_block + head_offset
                                        : table[t_first / a.block_size] * a.stride_block
                                              + head_offset;  // then pass 2's first block
    prefetch.start((b < last_block ? a.key_cache : a.value_cache) + next, a.stride_slot,
                   row_elements, a.block_size);
    if (D % 16 == 0) {
      for (int g0 = lo; g0 < hi; g0 += 16)
        score_16_tokens(a.key_cache + base + (g0 - t0) * a.stride_slot, a.stride_slot,
                        hi - g0 < 16 ? hi - g0 : 16, q, nh, G, D, a.scale,
                        scores + (g0 - first), n, prefetch);
      continue;
    }
    for (int t = lo; t < hi; ++t) {
      const T* __restrict k = a.key_cache + base + (t - t0) * a.stride_slot;
      prefetch.step(2 * nh);
      for (int h = 0; h < nh; ++h) {
        const float* __restrict qh = q + h * D;
        const T* __restrict kh = k + (h / G) * D;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; ++d) s += qh[d] * to_f32(kh[d]);
        scores[static_cast<size_t>(h) * n + (t - first)] = s * a.scale;
      }
    }
  }
  // Softmax of each head's row, in place; the 1 / sum is applied at the end.
  for (int h = 0; h < nh; ++h) {
    float* __restrict row = scores + static_cast<size_t>(h) * n;
    float m = row[0];
#pragma omp simd reduction(max : m)  // a serial max was ~15% of the kernel's time
    for (int t = 1; t < n; ++t) m = row[t] > m ? row[t] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) {
      const float p = exp_clamped(row[t] - m);
      row[t] = p;
      sum += p;
    }
    inv_sum[h] = 1.0f / sum;
  }
  // Pass 2: acc[h] = sum_t p[h, t] v_t
  std::memset(acc, 0, sizeof(float) * nh * D);
  for (int t0 = t_first; t0 < seq_len; t0 += a.block_size) {
    const int b = t0 / a.block_size;
    const int64_t base = table[b] * a.stride_block + head_offset;
    const int lo = t0 < first ? first : t0;
    const int hi = t0 + a.block_size < seq_len ? t0 + a.block_size : seq_len;
    if (b < last_block)
      prefetch.start(a.value_cache + table[b + 1] * a.stride_block + head_offset, a.stride_slot,
                     row_elements, a.block_size);
    if constexpr (HEAD_DIM > 0 && HEAD_DIM % 16 == 0) {
      // Per head, its sum in registers over the block's tokens: one load and store of the
      // sum per block instead of per token.
      constexpr int V = HEAD_DIM / 16;
      for (int h = 0; h < nh; ++h) {
        float* __restrict ah = acc + h * D;
        v16 sum[V];
        for (int c = 0; c < V; ++c) sum[c] = load16(ah + 16 * c);
        const float* __restrict ph = scores + static_cast<size_t>(h) * n + (lo - first);
        const T* __restrict vh = a.value_cache + base + (lo - t0) * a.stride_slot + (h / G) * D;
        for (int t = lo; t < hi; ++t, vh += a.stride_slot) {
          prefetch.step(2);
          const float p = ph[t - lo];
          for (int c = 0; c < V; ++c) sum[c] += p * load16(vh + 16 * c);
        }
        std::memcpy(ah, sum, sizeof sum);
      }
      continue;
    }
    for (int t = lo; t < hi; ++t) {
      prefetch.step(2 * nh);
      const T* __restrict v = a.value_cache + base + (t - t0) * a.stride_slot;
      for (int h = 0; h < nh; ++h)
        add_scaled(acc + h * D, scores[static_cast<size_t>(h) * n + (t - first)],
                   v + (h / G) * D, D);
    }
  }
  T* __restrict o = a.out + a.rows[decode] * a.stride_out + head_offset * G;
  for (int h = 0; h < nh; ++h) {
#pragma omp simd
    for (int d = 0; d < D; ++d) o[h * D + d] = from_f32<T>(acc[h * D + d] * inv_sum[h]);
  }
}

// Attention of every decode in `a`, shared among the threads of the enclosing parallel region
// (an orphaned `omp for`, barrier at the end): one task per decode when there are enough of
// them to keep the threads busy (a token's K/V rows read front to back), one per (decode, kv
// head) otherwise.
template <int HEAD_DIM, typename T>
inline void attend_all_for(const Args<T>& a, int64_t num_decodes, int head_dim,
                           std::vector<float>& scratch) {
  const int split = num_decodes >= 4 * omp_get_num_threads() ? 1 : a.num_kv_heads;
  const int per_task = a.num_kv_heads / split;
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < num_decodes * split; ++task) {
    const int kv_lo = static_cast<int>(task % split) * per_task;
    attend<HEAD_DIM>(a, task / split, kv_lo, kv_lo + per_task, head_dim, scratch);
  }
}

#undef SHUFFLE

}  // namespace pagedserve

// One decode step of a Llama-family decoder on CPU, fp32 or bf16, for a few decodes (one query
// token each): every layer's norms, GEMMs (from cpu_linear's packed copies), q/k norm, rotary, KV
// cache write, attention and SiLU-and-mul in one call and one OpenMP parallel region, the
// phases separated by the barriers of their work-sharing loops. Per layer this replaces ~20
// torch ops and kernel calls from Python, whose cost (dispatch, waking threads, caches the
// weight streams evicted) exceeded the arithmetic at these batch sizes. fp32 steps take
// 8-bit projections too (gemm_q8.h: the input rows quantized, then the int8 GEMM).
//
// Same additions in the same order as the model's layers (server/models/llama.py): the residual
// stream carries the sum of everything before a layer's MLP output. In bf16 every activation
// is bf16 between the ops, as in the model's layers: the GEMMs (gemm_bf16.h), the row ops
// (fused.h) and attention (paged_decode.h) take bf16 and compute in fp32.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "fused.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "gemm_q8.h"
#include "paged_decode.h"

namespace {

// Columns of the per-layer table (kernels/cpu_decoder.py LAYER_COLUMNS): pointers (0: absent),
// then each projection's amx_min_rows (gemm_bf16.h), then each projection's tiles of
// gemm_q8.h (0: float, 1: 8-bit, 2: 4-bit; fp32 steps only).
enum Column {
  kInputNorm, kQkv, kQkvBias, kQNorm, kKNorm, kO, kOBias, kPostNorm, kGateUp, kGateUpBias,
  kDown, kDownBias, kKeyCache, kValueCache, kQkvAmx, kOAmx, kGateUpAmx, kDownAmx, kQkvQ8,
  kOQ8, kGateUpQ8, kDownQ8, kColumns
};

// The activation rows of an 8-bit projection, quantized (gemm_q8.h): shared by the threads.
struct Q8Scratch {
  uint8_t* values;
  float* scales;
};

template <typename T>
struct Step {
  const T* embeddings;  // [rows, hidden]
  const T* cos;         // [rows, head_dim]
  const T* sin;
  const int64_t* layers;  // [num_layers, kColumns] pointers
  const T* final_norm;
  const int64_t* slots;        // [rows] cache slot of each row's new token; < 0: not written
  const int32_t* block_table;  // [rows, stride_table]
  int64_t stride_table;
  const int32_t* seq_lens;  // [rows]
  T* out;                   // [rows, hidden]
  int64_t rows, num_layers, hidden, heads, kv_heads, head_dim, intermediate;
  int64_t block_size, stride_block, stride_slot;
  float eps, scale;
  int sliding_window;
};

template <typename T>
inline const T* column(const int64_t* layer, Column c) {
  return reinterpret_cast<const T*>(layer[c]);
}

inline void gemm(const float* x, int64_t ldx, const float* packed, const float* bias,
                 float* out, int64_t ldo, int64_t rows, int n, int k, int64_t, int64_t q8,
                 const Q8Scratch& scratch) {
  if (q8 != 0) {
    pagedserve::q8::quantize_rows_for(x, ldx, rows, k, scratch.values, scratch.scales);
    pagedserve::q8::gemm_for(scratch.values, scratch.scales,
                             reinterpret_cast<const uint8_t*>(packed), bias, out, ldo, rows, n,
                             k, q8 == 2);
    return;
  }
  pagedserve::gemm_packed_for(x, ldx, packed, bias, out, ldo, rows, n, k);
}

inline void gemm(const pagedserve::bf16* x, int64_t ldx, const pagedserve::bf16* packed,
                 const pagedserve::bf16* bias, pagedserve::bf16* out, int64_t ldo, int64_t rows,
                 int n, int k, int64_t amx_min_rows, int64_t, const Q8Scratch&) {
  pagedserve::gemm_packed_bf16_for(x, ldx, packed, bias, out, ldo, rows, n, k, amx_min_rows);
}

template <int HEAD_DIM, typename T>
void run_step(const Step<T>& s, const int64_t* index, int num_threads) {
  const int64_t M = s.rows, H = s.hidden, D = s.head_dim, I = s.intermediate;
  const int64_t q_size = s.heads * D, kv_size = s.kv_heads * D, qkv_n = q_size + 2 * kv_size;
  std::vector<T> buffer(M * (3 * H + qkv_n + q_size + 3 * I + H));
  T* residual = buffer.data();  // [M, H]
  T* x = residual + M * H;      // [M, H] normed input of a GEMM
  T* o = x + M * H;             // [M, H] attention projection
  T* h = o + M * H;             // [M, H] MLP output
  T* qkv = h + M * H;           // [M, qkv_n]
  T* attn = qkv + M * qkv_n;    // [M, q_size]
  T* gate_up = attn + M * q_size;  // [M, 2 I]
  T* act = gate_up + M * 2 * I;    // [M, I]
  std::memcpy(residual, s.embeddings, sizeof(T) * M * H);
  const int64_t widest = std::max({H, q_size, I});  // the inputs of a projection
  std::vector<uint8_t> q8_values(M * widest);
  std::vector<float> q8_scales(2 * (M * widest / 32 + 1));
  const Q8Scratch q8{q8_values.data(), q8_scales.data()};

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch;
    for (int64_t l = 0; l < s.num_layers; ++l) {
      const int64_t* p = s.layers + l * kColumns;
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        pagedserve::add_rms_norm_row(l == 0 ? nullptr : h + m * H, residual + m * H,
                                     column<T>(p, kInputNorm), x + m * H, H, s.eps);
      gemm(x, H, column<T>(p, kQkv), column<T>(p, kQkvBias), qkv, qkv_n, M,
           static_cast<int>(qkv_n), static_cast<int>(H), p[kQkvAmx], p[kQkvQ8], q8);
      T* key_cache = const_cast<T*>(column<T>(p, kKeyCache));
      T* value_cache = const_cast<T*>(column<T>(p, kValueCache));
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        T* q = qkv + m * qkv_n;
        T* k = q + q_size;
        const T* v = k + kv_size;
        if (p[kQNorm] != 0) {
          for (int64_t j = 0; j < s.heads; ++j)
            pagedserve::rms_norm_row(q + j * D, column<T>(p, kQNorm), q + j * D, D, s.eps);
          for (int64_t j = 0; j < s.kv_heads; ++j)
            pagedserve::rms_norm_row(k + j * D, column<T>(p, kKNorm), k + j * D, D, s.eps);
        }
        pagedserve::rotary_row(q, s.cos + m * D, s.sin + m * D,
                               static_cast<int>(s.heads + s.kv_heads), static_cast<int>(D));
        const int64_t slot = s.slots[m];
        if (slot >= 0) {
          const int64_t at = slot / s.block_size * s.stride_block
                             + slot % s.block_size * s.stride_slot;
          std::memcpy(key_cache + at, k, sizeof(T) * kv_size);
          std::memcpy(value_cache + at, v, sizeof(T) * kv_size);
        }
      }
      const pagedserve::Args<T> a{qkv, qkv_n, attn, q_size, key_cache, value_cache,
                               s.stride_block, s.stride_slot, s.block_table, s.stride_table,
                               s.seq_lens, index, index, static_cast<int>(s.heads),
                               static_cast<int>(s.kv_heads), static_cast<int>(s.block_size),
                               s.scale, s.sliding_window};
      pagedserve::attend_all_for<HEAD_DIM>(a, M, static_cast<int>(D), scratch);
      gemm(attn, q_size, column<T>(p, kO), column<T>(p, kOBias), o, H, M, static_cast<int>(H),
           static_cast<int>(q_size), p[kOAmx], p[kOQ8], q8);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        pagedserve::add_rms_norm_row(o + m * H, residual + m * H, column<T>(p, kPostNorm),
                                     x + m * H, H, s.eps);
      gemm(x, H, column<T>(p, kGateUp), column<T>(p, kGateUpBias), gate_up, 2 * I, M,
           static_cast<int>(2 * I), static_cast<int>(H), p[kGateUpAmx], p[kGateUpQ8], q8);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m)
        pagedserve::silu_and_mul_row(gate_up + m * 2 * I, gate_up + m * 2 * I + I, act + m * I,
                                     I);
      gemm(act, I, column<T>(p, kDown), column<T>(p, kDownBias), h, H, M, static_cast<int>(H),
           static_cast<int>(I), p[kDownAmx], p[kDownQ8], q8);
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      pagedserve::add_rms_norm_row(s.num_layers > 0 ? h + m * H : nullptr, residual + m * H,
                                   s.final_norm, s.out + m * H, H, s.eps);
  }
}

// What the step will follow through raw pointers must lie inside the cache: every block id a
// row reads, its length against its block_table row, its write slot.
template <typename T>
bool in_range(const Step<T>& s, int64_t num_blocks) {
  for (int64_t m = 0; m < s.rows; ++m) {
    const int64_t len = s.seq_lens[m];
    if (len < 1 || len > s.stride_table * s.block_size) return false;
    const int32_t* table = s.block_table + m * s.stride_table;
    for (int64_t b = 0; b < (len + s.block_size - 1) / s.block_size; ++b)
      if (table[b] < 0 || table[b] >= num_blocks) return false;
    if (s.slots[m] >= num_blocks * s.block_size) return false;
  }
  return true;
}

// Returns 0; -1 for a head layout it cannot run; -2 when a block id, length or slot is out of
// range (nothing was written).
template <typename T>
int decode_step(const Step<T>& s, int64_t num_blocks, int num_threads) {
  if (s.kv_heads <= 0 || s.heads % s.kv_heads != 0 || s.head_dim % 2 != 0) return -1;
  if (!in_range(s, num_blocks)) return -2;
  std::vector<int64_t> index(s.rows);  // row m decodes sequence m
  for (int64_t m = 0; m < s.rows; ++m) index[m] = m;
  switch (s.head_dim) {
    case 64: run_step<64>(s, index.data(), num_threads); break;
    case 128: run_step<128>(s, index.data(), num_threads); break;
    default: run_step<0>(s, index.data(), num_threads); break;
  }
  return 0;
}

}  // namespace

extern "C" {

#define PAGEDSERVE_DECODE_STEP(suffix, T)                                                     \
  int pagedserve_decode_step_##suffix(                                                        \
      const T* embeddings, const T* cos, const T* sin, const int64_t* layers,                 \
      const T* final_norm, const int64_t* slots, const int32_t* block_table,                  \
      int64_t stride_table, const int32_t* seq_lens, T* out, int64_t rows, int64_t num_layers, \
      int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, \
      int64_t num_blocks, int64_t block_size, int64_t stride_block, int64_t stride_slot,      \
      float eps, float scale, int sliding_window, int num_threads) {                          \
    const Step<T> s{embeddings, cos, sin, layers, final_norm, slots, block_table,             \
                    stride_table, seq_lens, out, rows, num_layers, hidden, heads, kv_heads,   \
                    head_dim, intermediate, block_size, stride_block, stride_slot, eps,       \
                    scale, sliding_window};                                                   \
    return decode_step(s, num_blocks, num_threads);                                           \
  }

PAGEDSERVE_DECODE_STEP(f32, float)
PAGEDSERVE_DECODE_STEP(bf16, pagedserve::bf16)

#undef PAGEDSERVE_DECODE_STEP

}  // extern "C"

// Structured outputs' token mask on CPU: logits of the tokens a row's bitmask does not allow
// become -inf. Bit b of word w (int32, little-endian bit order) allows token 32 * w + b.
// Rows in parallel; within a row a word decides 32 tokens at once: all allowed (skipped), none
// (32 stores), or some (bit by bit), so a grammar that allows few tokens costs no more than one
// that allows many.
#include <cstdint>
#include <limits>

extern "C" void pagedserve_apply_bitmask_f32(float* logits, int64_t logits_stride,
                                             const int32_t* bitmask, int64_t bitmask_stride,
                                             const int64_t* rows, int64_t num_rows,
                                             int64_t vocab, int threads) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t words = (vocab + 31) / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t row = rows[i];
    float* out = logits + row * logits_stride;
    const int32_t* mask = bitmask + row * bitmask_stride;
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t bits = static_cast<uint32_t>(mask[w]);
      if (bits == 0xFFFFFFFFu) continue;
      const int64_t base = w * 32;
      const int64_t n = vocab - base < 32 ? vocab - base : 32;
      if (bits == 0) {
        for (int64_t b = 0; b < n; ++b) out[base + b] = neg_inf;
        continue;
      }
      for (int64_t b = 0; b < n; ++b) {
        if (!((bits >> b) & 1u)) out[base + b] = neg_inf;
      }
    }
  }
}

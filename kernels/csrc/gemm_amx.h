// bf16 GEMM on AMX tiles (Intel Xeon from Sapphire Rapids on), for gemm_bf16.h: out[M, N] =
// x[M, K] . W[N, K]^T (+ bias), fp32 sums rounded once, K a multiple of 32. The packed layout
// of gemm_bf16.h ([ceil(N / 16)][K / 2][16][2]) is already AMX's B-tile layout: 32 k steps of a
// 16-column block are one 16 x 64-byte tile. Each pass multiplies a tile of up to 16 rows of
// x (one A tile) into up to 6 column blocks (C tiles tmm2-7, B streamed through tmm1).

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "gemm.h"

namespace pagedserve {
namespace amx {

constexpr int kBlocks = 6;  // C tiles per pass

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands AMX's tile state to a process only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults.
inline bool available() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

inline void configure(int rows) {
  TileConfig cfg;
  cfg.rows[0] = static_cast<uint8_t>(rows);  // A: rows x 32 bf16
  cfg.colsb[0] = 64;
  cfg.rows[1] = 16;  // B: 16 pairs x 16 columns
  cfg.colsb[1] = 64;
  for (int t = 2; t < 8; ++t) {  // C: rows x 16 fp32
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One pass: `rows` (<= 16, as configured) rows from x into `blocks` (<= kBlocks) column blocks
// from block b0.
inline void pass(const bf16* x, int64_t ldx, const bf16* packed, const bf16* bias, bf16* out,
                 int64_t ldo, int rows, int b0, int blocks, int n, int k) {
  _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
  const int64_t block_stride = static_cast<int64_t>(k) * 16;
  const bf16* w = packed + b0 * block_stride;
  for (int k0 = 0; k0 < k; k0 += 32) {
    _tile_loadd(0, x + k0, ldx * 2);
    const bf16* wk = w + static_cast<int64_t>(k0) * 16;  // pair k0 / 2 of each block
#define PAGEDSERVE_AMX_BLOCK(c, tile)              \
    if (blocks > c) {                              \
      _tile_loadd(1, wk + (c) * block_stride, 64); \
      _tile_dpbf16ps(tile, 0, 1);                  \
    }
    PAGEDSERVE_AMX_BLOCK(0, 2) PAGEDSERVE_AMX_BLOCK(1, 3) PAGEDSERVE_AMX_BLOCK(2, 4)
    PAGEDSERVE_AMX_BLOCK(3, 5) PAGEDSERVE_AMX_BLOCK(4, 6) PAGEDSERVE_AMX_BLOCK(5, 7)
#undef PAGEDSERVE_AMX_BLOCK
  }
  alignas(64) float sums[kBlocks][16][16];
  _tile_stored(2, sums[0], 64); _tile_stored(3, sums[1], 64); _tile_stored(4, sums[2], 64);
  _tile_stored(5, sums[3], 64); _tile_stored(6, sums[4], 64); _tile_stored(7, sums[5], 64);
  for (int c = 0; c < blocks; ++c) {
    const int col = (b0 + c) * 16;
    const int cols = n - col < 16 ? n - col : 16;
    for (int m = 0; m < rows; ++m) {
      bf16* o = out + m * ldo + col;
      for (int j = 0; j < cols; ++j)
        o[j] = f32_to_bf16(bias != nullptr ? sums[c][m][j] + bf16_to_f32(bias[col + j])
                                           : sums[c][m][j]);
    }
  }
}

// Every thread of the enclosing parallel region (or a team of one) takes a contiguous run of
// kBlocks-block groups and all rows for each; a barrier at the end.
inline void gemm_for(const bf16* x, int64_t ldx, const bf16* packed, const bf16* bias, bf16* out,
                     int64_t ldo, int64_t rows, int n, int k) {
  const int num_blocks = (n + 15) / 16;
  int g_lo, g_hi;
  gemm_detail::thread_share((num_blocks + kBlocks - 1) / kBlocks, g_lo, g_hi);
  int configured = 0;
  for (int g = g_lo; g < g_hi; ++g) {
    const int b0 = g * kBlocks;
    const int blocks = num_blocks - b0 < kBlocks ? num_blocks - b0 : kBlocks;
    for (int64_t m0 = 0; m0 < rows; m0 += 16) {
      const int r = rows - m0 < 16 ? static_cast<int>(rows - m0) : 16;
      if (r != configured) {
        configure(r);
        configured = r;
      }
      pass(x + m0 * ldx, ldx, packed, bias, out + m0 * ldo, ldo, r, b0, blocks, n, k);
    }
  }
  if (configured != 0) _tile_release();
#pragma omp barrier
}

}  // namespace amx
}  // namespace pagedserve

#endif

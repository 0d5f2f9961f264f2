"""Dequantize-GEMM (Triton) for weights held in blocks of 32 values along the input dimension.

    w[n, k] = scales[n, k // 32] * q[n, k] + (mins[n, k // 32] if mins is given else 0)
    out = x @ w.T (+ bias), accumulated in fp32, returned in x's dtype

x is [M, K] (fp32, fp16 or bf16; unit stride along K, any row stride; K a multiple of 32),
scales and mins are fp16 [N, K // 32], bias is [N] in x's dtype or fp32. The dtype of `values`
names the layout of q:
* int8 [N, K]: 8-bit, q = values (signed, -128..127).
* uint8 [N, K // 2]: 4-bit nibbles (0..15, unsigned), GGUF Q4_0's byte layout. Block b of a row
  is bytes 16 b .. 16 b + 15; byte 16 b + j holds value 32 b + j in its low nibble and value
  32 b + j + 16 in its high nibble. `pack_nibbles` makes it.

Each program owns a [BLOCK_M, BLOCK_N] tile of out and walks K in steps of BLOCK_K: it dequantizes
a [BLOCK_K, BLOCK_N] tile of w^T in fp32 registers, casts it to x's dtype (fp32 stays fp32: "ieee"
dots, no TF32) and feeds tl.dot. A 4-bit tile is used as its two halves in place (low nibbles,
high nibbles), each against the columns of x it holds, so no nibble is moved between lanes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GROUP = 32  # values per scale (and per min); the kernel spells it as the literal 32
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequantize(q, scale_ptrs, min_ptrs, mask, HAS_MINS: tl.constexpr):
    """Integer tile q -> fp32 d * q + m, with d and m gathered per element (one per 32 values)."""
    w = q.to(tl.float32) * tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MINS:
        w += tl.load(min_ptrs, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _load_x(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16
        x = x.to(tl.float32)
    return x


@triton.jit
def linear_blocks_kernel(
    out_ptr,  # [M, N], x's dtype
    x_ptr,  # [M, K], unit stride along K
    values_ptr,  # [N, K] int8 or (FOUR_BIT) [N, K // 2] uint8, unit stride along K
    scales_ptr,  # [N, K // 32] fp16
    mins_ptr,  # [N, K // 32] fp16; read only if HAS_MINS
    bias_ptr,  # [N] x's dtype or fp32; read only if HAS_BIAS
    M, N, K,
    stride_x_m, stride_values_n, stride_scales_n, stride_mins_n, stride_out_m,
    FOUR_BIT: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows_n = offs_n.to(tl.int64)[None, :]  # rows of the weight, columns of the w^T tiles
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m  # [BLOCK_M, 1]
    v_cols = values_ptr + rows_n * stride_values_n  # [1, BLOCK_N]
    s_cols = scales_ptr + rows_n * stride_scales_n
    mn_cols = mins_ptr + rows_n * stride_mins_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FOUR_BIT:
        # Half tile column c (0 .. BLOCK_K / 2): byte k0 / 2 + c, block k0 / 32 + c // 16,
        # value k0 + (c // 16) * 32 + c % 16 (low nibble) and that + 16 (high nibble).
        offs_c = tl.arange(0, BLOCK_K // 2)
        k_lo_rel = (offs_c // 16) * 32 + offs_c % 16
        for k0 in range(0, K, BLOCK_K):
            k_lo = k0 + k_lo_rel
            k_mask = k_lo < K  # whole blocks: k_lo < K iff k_lo + 16 < K
            w_mask = k_mask[:, None] & n_mask[None, :]
            packed = tl.load(v_cols + (k0 // 2 + offs_c)[:, None], mask=w_mask, other=0)
            block = (k0 // 32 + offs_c // 16)[:, None]
            w_lo = _dequantize(packed & 15, s_cols + block, mn_cols + block, w_mask, HAS_MINS)
            w_hi = _dequantize(packed >> 4, s_cols + block, mn_cols + block, w_mask, HAS_MINS)
            x_mask = m_mask[:, None] & k_mask[None, :]
            x_lo = _load_x(x_rows + k_lo[None, :], x_mask, UPCAST)
            x_hi = _load_x(x_rows + (k_lo + 16)[None, :], x_mask, UPCAST)
            acc = tl.dot(x_lo, w_lo.to(x_lo.dtype), acc, input_precision="ieee")
            acc = tl.dot(x_hi, w_hi.to(x_hi.dtype), acc, input_precision="ieee")
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            w_mask = k_mask[:, None] & n_mask[None, :]
            q = tl.load(v_cols + k[:, None], mask=w_mask, other=0)
            block = (k // 32)[:, None]
            w = _dequantize(q, s_cols + block, mn_cols + block, w_mask, HAS_MINS)
            x = _load_x(x_rows + k[None, :], m_mask[:, None] & k_mask[None, :], UPCAST)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out_m + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_groups(name: str, t: torch.Tensor | None, num_out: int, num_groups: int) -> None:
    if t is None:
        return
    if t.dtype != torch.float16 or t.shape != (num_out, num_groups):
        raise ValueError(f"{name} must be float16 [N={num_out}, K // 32={num_groups}], got "
                         f"{t.dtype} {tuple(t.shape)}")
    if num_groups > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along K // 32, got {t.stride()}")


def check_args(x, values, scales, mins, bias) -> bool:
    """Raise ValueError on a bad argument; return whether values are 4-bit nibbles."""
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D float32, float16 or bfloat16 tensor [M, K], got "
                         f"{x.dtype} {tuple(x.shape)}")
    num_in = x.shape[1]
    if num_in == 0 or num_in % GROUP:
        raise ValueError(f"K (x.shape[1]) must be a positive multiple of {GROUP}, got {num_in}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along K, got strides {x.stride()}")
    if values.dim() != 2 or values.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"values must be 2-D int8 [N, K] or uint8 nibbles [N, K // 2], got "
                         f"{values.dtype} {tuple(values.shape)}")
    four_bit = values.dtype == torch.uint8
    want = num_in // 2 if four_bit else num_in
    if values.shape[1] != want:
        kind = "uint8 (4-bit nibbles) [N, K // 2" if four_bit else "int8 [N, K"
        raise ValueError(f"values must be {kind}={want}] for K={num_in}, got "
                         f"{tuple(values.shape)}")
    if values.stride(1) != 1:
        raise ValueError(f"values must have unit stride along K, got strides {values.stride()}")
    num_out = values.shape[0]
    _check_groups("scales", scales, num_out, num_in // GROUP)
    _check_groups("mins", mins, num_out, num_in // GROUP)
    if bias is not None:
        if bias.shape != (num_out,) or bias.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"bias must be [N={num_out}] in x's dtype ({x.dtype}) or float32, "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        if num_out > 1 and bias.stride(0) != 1:
            raise ValueError(f"bias must have unit stride, got {bias.stride()}")
    tensors = [t for t in (x, values, scales, mins, bias) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return four_bit


def kernel_constexprs(num_tokens: int, num_in: int, four_bit: bool, has_mins: bool,
                      has_bias: bool, upcast: bool = False) -> dict[str, int | bool]:
    """The compile-time parameters the wrapper launches with for these shapes (also what the
    ahead-of-time compile test builds). Decode (M <= 16): 16 rows (tl.dot's minimum), narrow
    32-row weight tiles for more programs across N, long 128-value K steps; larger M: 32 or 64
    rows by 64 columns by 64 values. BLOCK_K shrinks to K rounded up to a power of two."""
    if num_tokens <= 16:
        block_m, block_n, block_k = 16, 32, 128
    elif num_tokens <= 32:
        block_m, block_n, block_k = 32, 64, 64
    else:
        block_m, block_n, block_k = 64, 64, 64
    block_k = min(block_k, max(GROUP, triton.next_power_of_2(num_in)))
    return dict(FOUR_BIT=four_bit, HAS_MINS=has_mins, HAS_BIAS=has_bias, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast)


def linear_blocks(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) -> [M, N] in x's dtype, w dequantized from `values` (int8 [N, K]
    or uint8 nibbles [N, K // 2], see the module docstring), `scales` and `mins`."""
    four_bit = check_args(x, values, scales, mins, bias)
    num_tokens, num_in = x.shape
    num_out = values.shape[0]
    out = torch.empty((num_tokens, num_out), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or num_out == 0:
        return out
    upcast = _interpreting() and x.dtype == torch.bfloat16
    meta = kernel_constexprs(num_tokens, num_in, four_bit, mins is not None, bias is not None,
                             upcast)
    grid = (triton.cdiv(num_out, meta["BLOCK_N"]), triton.cdiv(num_tokens, meta["BLOCK_M"]))
    mins_arg = scales if mins is None else mins  # never read without HAS_MINS
    linear_blocks_kernel[grid](
        out, x, values, scales, mins_arg, scales if bias is None else bias,
        num_tokens, num_out, num_in,
        x.stride(0), values.stride(0), scales.stride(0), mins_arg.stride(0), out.stride(0),
        **meta)
    return out


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int8 or uint8 [N, K] values in 0..15 (K a multiple of 32) -> uint8 [N, K // 2] in the
    4-bit layout: per block of 32, byte j = value j | value j + 16 << 4."""
    if values.dim() != 2 or values.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"values must be a 2-D int8 or uint8 tensor, got {values.dtype} "
                         f"{tuple(values.shape)}")
    num_out, num_in = values.shape
    if num_in % GROUP:
        raise ValueError(f"K must be a multiple of {GROUP}, got {num_in}")
    if values.numel() and (values.min() < 0 or values.max() > 15):
        raise ValueError("4-bit values must lie in 0..15")
    v = values.to(torch.uint8).reshape(num_out, num_in // GROUP, 2, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(num_out, num_in // 2)

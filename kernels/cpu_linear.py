"""GEMMs on CPU through kernels/csrc/gemm_cpu.cpp from a weight packed once, fp32 (gemm.h) or
bf16 with fp32 accumulation (gemm_bf16.h: AVX512_BF16 dot products where the CPU has them).
`pack` makes the copy; `linear` is F.linear with it.

Layouts: fp32 [ceil(out / 16), in, 16] (16 output columns side by side per input); bf16
[ceil(out / 16), in / 2, 16, 2] (per pair of inputs, each column's two weights side by side),
`in` even.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "gemm_cpu"
_ARGS = [PTR, I64, PTR, PTR, PTR, I64, I64, I32, I32]  # then the thread count
_SIGNATURES = {"pagedserve_gemm_packed_f32": ([*_ARGS, I32], None),
               "pagedserve_gemm_packed_bf16": ([*_ARGS, I64, I32], None),  # amx_min_rows
               "pagedserve_gemm_amx_available": ([], ctypes.c_int)}
DTYPES = (torch.float32, torch.bfloat16)


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def amx() -> bool:
    """Whether the bf16 GEMM can run on AMX tiles here (built for a CPU with AMX-BF16, and the
    kernel granted the tile state)."""
    lib = _library()
    return lib is not None and bool(lib.pagedserve_gemm_amx_available())


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel takes weights and activations of this dtype."""
    return dtype in DTYPES


def packed_shape(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[int, ...]:
    blocks = -(-out_features // 16)
    if dtype == torch.bfloat16:
        return (blocks, in_features // 2, 16, 2)
    return (blocks, in_features, 16)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> the layout above, the columns past `out` zero. bf16 needs `in` even."""
    out_features, in_features = weight.shape
    assert supports(weight.dtype), weight.dtype
    if weight.dtype == torch.bfloat16 and in_features % 2:
        raise RuntimeError(f"the bf16 GEMM takes an even number of inputs, not {in_features}")
    num_blocks = -(-out_features // 16)
    padded = weight.new_zeros(num_blocks * 16, in_features)
    padded[:out_features] = weight.detach()
    if weight.dtype == torch.bfloat16:  # [blocks, 16, in/2, 2] -> [blocks, in/2, 16, 2]
        return padded.view(num_blocks, 16, in_features // 2, 2).transpose(1, 2).contiguous()
    return padded.view(num_blocks, 16, in_features).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, amx_min_rows: int = 0) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, in] with contiguous rows, from `pack(weight)`, in
    the weight's dtype. bf16 runs on AMX tiles from `amx_min_rows` rows where `amx()`."""
    lib = _library()
    assert lib is not None, "call available() first"
    rows, in_features = x.shape
    assert x.dtype == packed.dtype and x.stride(1) == 1 and packed.is_contiguous()
    assert packed.shape == packed_shape(out_features, in_features, x.dtype), packed.shape
    assert bias is None or (bias.is_contiguous() and bias.shape == (out_features,)
                            and bias.dtype == x.dtype)
    out = x.new_empty((rows, out_features))
    args = (x.data_ptr(), x.stride(0), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows,
            out_features, in_features)
    if x.dtype == torch.bfloat16:
        lib.pagedserve_gemm_packed_bf16(*args, amx_min_rows, torch.get_num_threads())
    else:
        lib.pagedserve_gemm_packed_f32(*args, torch.get_num_threads())
    return out

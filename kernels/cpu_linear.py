"""fp32 GEMMs of few rows on CPU through kernels/csrc/gemm_cpu.cpp, from a weight packed once
as [ceil(out / 16), in, 16]. `pack` makes that copy; `linear` is F.linear with it.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import native
from kernels.native import I32, I64, PTR

_NAME = "gemm_cpu"
_SIGNATURES = {"pagedserve_gemm_packed_f32": ([PTR, I64, PTR, PTR, PTR, I64, I64, I32, I32, I32],
                                              None)}


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel takes weights and activations of this dtype."""
    return dtype == torch.float32


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 -> [ceil(out / 16), in, 16], the columns past `out` zero."""
    out_features, in_features = weight.shape
    num_blocks = -(-out_features // 16)
    padded = weight.new_zeros(num_blocks * 16, in_features)
    padded[:out_features] = weight.detach()
    return padded.view(num_blocks, 16, in_features).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, in] fp32 with contiguous rows, from
    `pack(weight)`."""
    lib = _library()
    assert lib is not None, "call available() first"
    fn = lib.pagedserve_gemm_packed_f32
    rows, in_features = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and packed.is_contiguous()
    assert packed.shape == (-(-out_features // 16), in_features, 16), packed.shape
    assert bias is None or (bias.is_contiguous() and bias.shape == (out_features,))
    out = x.new_empty((rows, out_features))
    fn(x.data_ptr(), x.stride(0), packed.data_ptr(), None if bias is None else bias.data_ptr(),
       out.data_ptr(), out.stride(0), rows, out_features, in_features, torch.get_num_threads())
    return out

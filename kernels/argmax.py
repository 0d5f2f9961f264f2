"""Greedy sampling's argmax on CPU through kernels/csrc/argmax_cpu.cpp: each logits row's first
maximum, read in the logits' own dtype (fp32 or bf16), so a bf16 model's greedy rows need no
fp32 copy of the logits. The torch reference (kernels/reference.py `argmax_rows`) is the
fallback and takes everything else (CUDA tensors, other dtypes, strided columns)."""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native, reference
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "argmax_cpu"
_SUFFIXES = native.SUFFIXES
_SIGNATURES = {f"pagedserve_argmax_{suffix}": ([PTR, I64, I64, I64, PTR, I32], None)
               for suffix in _SUFFIXES.values()}


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] -> [rows] int64: the index of each row's first maximum (its first
    NaN where a row has one), as `logits.max(dim=-1).indices`."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [rows, vocab] with vocab > 0, got "
                         f"{tuple(logits.shape)}")
    lib = _library() if logits.device.type == "cpu" else None
    if lib is None or logits.dtype not in _SUFFIXES or logits.stride(1) != 1:
        return reference.argmax_rows(logits)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    getattr(lib, f"pagedserve_argmax_{_SUFFIXES[logits.dtype]}")(
        logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr(),
        torch.get_num_threads())
    return out

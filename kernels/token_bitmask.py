"""Applying a structured-outputs token bitmask to logits on CPU, through
kernels/csrc/bitmask_cpu.cpp: the logits a row's bitmask does not allow become -inf, in place.
The torch reference (kernels/reference.py `apply_token_bitmask`) is the fallback."""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native, reference
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "bitmask_cpu"
_SIGNATURES = {
    "pagedserve_apply_bitmask_f32": ([PTR, I64, PTR, I64, PTR, I64, I64, I32], None),
}


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits [batch, vocab] fp32; bitmask [batch, ceil(vocab / 32)] int32 (bit b of word w
    allows token 32w + b); only `rows` are masked."""
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must "
                         f"be [batch, vocab] and [batch, ceil(vocab / 32)]")
    if bitmask.dtype != torch.int32 or bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"the bitmask must be int32 with at least ceil(vocab / 32) words, got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    if any(not 0 <= r < logits.shape[0] for r in rows):
        raise ValueError(f"rows must be in [0, {logits.shape[0]})")
    lib = _library() if logits.device.type == "cpu" else None
    if (lib is None or logits.dtype != torch.float32 or logits.stride(1) != 1
            or bitmask.device.type != "cpu" or bitmask.stride(1) != 1):
        reference.apply_token_bitmask(logits, bitmask, rows)
        return
    index = torch.tensor(rows, dtype=torch.int64)
    lib.pagedserve_apply_bitmask_f32(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(),
                                     bitmask.stride(0), index.data_ptr(), len(rows),
                                     logits.shape[1], torch.get_num_threads())

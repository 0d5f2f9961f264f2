"""Fused element-wise decoder-layer steps on CPU through kernels/csrc/fused_cpu.cpp: residual add
+ RMSNorm, SiLU-and-mul, rotary embedding. fp32 or bf16 CPU tensors (all of one call in one
dtype) whose rows have a contiguous last dim; `supports` says when they apply, the callers keep
torch code for everything else. bf16 rows round where the torch code they replace rounds.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import F32, I32, I64, PTR

_NAME = "fused_cpu"
_SUFFIXES = native.SUFFIXES
DTYPES = tuple(_SUFFIXES)
_SIGNATURES = {
    f"pagedserve_{op}_{suffix}": signature for suffix in _SUFFIXES.values()
    for op, signature in (
        ("add_rms_norm", ([PTR, I64, PTR, I64, PTR, PTR, I64, I64, I64, F32, I32], None)),
        ("silu_and_mul", ([PTR, I64, PTR, I64, I64, I64, I32], None)),
        ("rotary", ([PTR, I64, PTR, PTR, I64, I32, I32, I32], None)))
}


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the library is built and loaded (builds it on the first call)."""
    return _library() is not None


def supports(t: torch.Tensor) -> bool:
    """A 2-D fp32 or bf16 CPU tensor with contiguous rows."""
    return (t.device.type == "cpu" and t.dtype in DTYPES and t.dim() == 2
            and t.stride(1) == 1)


def _fn(op: str, dtype: torch.dtype):
    lib = _library()
    assert lib is not None, "call available() first"
    return getattr(lib, f"pagedserve_{op}_{_SUFFIXES[dtype]}")


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """residual += x (in place; skipped when x is None), then RMSNorm(residual) * weight as a new
    tensor. All [rows, cols] (weight [cols]) of one dtype, `supports`-ed."""
    rows, cols = residual.shape
    assert supports(residual) and weight.is_contiguous() and weight.shape == (cols,)
    assert weight.dtype == residual.dtype
    if x is not None:
        assert supports(x) and x.shape == residual.shape and x.dtype == residual.dtype
    out = torch.empty_like(residual)
    _fn("add_rms_norm", residual.dtype)(
        None if x is None else x.data_ptr(), 0 if x is None else x.stride(0),
        residual.data_ptr(), residual.stride(0), weight.data_ptr(), out.data_ptr(),
        out.stride(0), rows, cols, eps, torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x [rows, 2n]."""
    assert supports(x) and x.shape[1] % 2 == 0
    rows, cols = x.shape[0], x.shape[1] // 2
    out = x.new_empty((rows, cols))
    _fn("silu_and_mul", x.dtype)(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
                                 rows, cols, torch.get_num_threads())
    return out


def supports_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """fp32 or bf16 CPU x [rows, heads, head_dim] with heads contiguous within a row, an even
    head_dim, and contiguous cos, sin of x's dtype."""
    return (x.device.type == "cpu" and x.dim() == 3
            and x.dtype == cos.dtype == sin.dtype and x.dtype in DTYPES
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] % 2 == 0
            and cos.is_contiguous() and sin.is_contiguous())


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of x [rows, heads, head_dim] in place (`supports_rotary`); cos, sin:
    [rows, head_dim], or [rows, 1, head_dim]."""
    assert supports_rotary(x, cos, sin)
    rows, heads, head_dim = x.shape
    cos, sin = cos.reshape(rows, head_dim), sin.reshape(rows, head_dim)
    _fn("rotary", x.dtype)(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), rows,
                           heads, head_dim, torch.get_num_threads())
    return x

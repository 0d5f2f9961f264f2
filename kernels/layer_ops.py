"""The element-wise steps of a decoder layer (RMSNorm with the residual add, SiLU-and-mul,
rotary), one entry point each. `backend` as for attention (kernels/ops.py): "auto" and
"cpu" run fp32 and bf16 CPU rows through kernels.cpu_fused where it is built and takes the
tensors, everything else (and "torch", "triton") through kernels.reference."""

from __future__ import annotations

import torch

from pagedserve_kernels import cpu_fused, reference

_FUSED = ("auto", "cpu")


def _fused(backend: str, *tensors: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    dtypes = {t.dtype for t in tensors} | ({weight.dtype} if weight is not None else set())
    return (backend in _FUSED and len(dtypes) == 1 and cpu_fused.available()
            and all(cpu_fused.supports(t) for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """RMSNorm(x), or with `residual`: residual += x in place, then RMSNorm(residual)."""
    if residual is None:
        if _fused(backend, x, weight=weight):
            return cpu_fused.add_rms_norm(None, x, weight, eps)
    elif _fused(backend, x, residual, weight=weight):
        return cpu_fused.add_rms_norm(x, residual, weight, eps)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x [rows, 2n]."""
    if _fused(backend, x):
        return cpu_fused.silu_and_mul(x)
    return reference.silu_and_mul(x)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           backend: str = "auto") -> torch.Tensor:
    """Rotary embedding of x [num_tokens, heads, head_dim]; may rotate x in place, so x must be
    the caller's own (a view into a fresh projection output, say)."""
    if backend in _FUSED and cpu_fused.available() and cpu_fused.supports_rotary(x, cos, sin):
        return cpu_fused.rotary_(x, cos, sin)
    return reference.rotary(x, cos, sin)

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_fused


class RMSNorm(nn.Module):
    """RMS normalisation in fp32, scaled by the weight after casting back (as transformers does).
    `fused` (set by `use_fused_cpu_ops`): fp32 CPU rows go through kernels.cpu_fused."""

    fused = False

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and cpu_fused.supports(x):
            return cpu_fused.add_rms_norm(None, x, self.weight, self.eps)
        dtype = x.dtype
        h = x if dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if dtype == torch.float32 else h.to(dtype))

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x, in place (the residual stream), then the norm of the sum."""
        if self.fused and cpu_fused.supports(x) and cpu_fused.supports(residual):
            return cpu_fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual.add_(x)
        return self(residual)

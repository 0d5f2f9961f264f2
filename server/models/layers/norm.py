from __future__ import annotations

import torch
from torch import nn

from pagedserve_kernels import ops
from server.models.layers.weights import set_weight_loader


class RMSNorm(nn.Module):
    """RMS normalisation through ops.rms_norm (fp32 inside, as transformers computes it)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.weight = set_weight_loader(nn.Parameter(torch.ones(hidden_size, dtype=dtype),
                                                     requires_grad=False))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x, in place (the residual stream), then the norm of the sum."""
        return ops.rms_norm(x, self.weight, self.eps, residual, backend=self.backend)

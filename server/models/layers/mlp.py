from __future__ import annotations

import torch
from torch import nn

from pagedserve_kernels import ops
from server.models.arch_config import ArchConfig
from server.models.base import ModelOptions
from server.models.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one GEMM (gate_up_proj)."""

    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__()
        method, dtype = options.linear_method, options.dtype
        self.backend = options.kernel_backend
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                         bias=cfg.mlp_bias, method=method, dtype=dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias,
                                method=method, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x), backend=self.backend))

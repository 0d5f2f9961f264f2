"""Linear layers that run fp32 GEMMs on CPU from a oneDNN-prepacked copy of the weight.

torch's CPU `F.linear` calls MKL on the plain [out, in] weight, which for the few-row GEMMs of a
decode step (4-64 rows) reaches 60-75% of what oneDNN does with a weight reordered once into its
blocked layout (the logits GEMM at 8 rows: 2x). For 1-3 rows (a lone decode) MKL's GEMV is faster,
so those keep the plain weight. The packed copy is made after loading, when the runner calls
`pack_linear_weights`, and costs a second copy of every linear weight in memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 4  # measured crossover on 2 Sapphire Rapids cores, README "Benchmarks"


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked copy of an fp32 CPU weight [out, in]; None where this torch build
    has no such op or its result disagrees with F.linear."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        probe = torch.randn(PACKED_MIN_ROWS, weight.shape[1], generator=torch.Generator()
                            .manual_seed(0))
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as e:
        logger.debug("no oneDNN prepacked linear in this torch: %s", e)
        return None
    if not torch.allclose(got, F.linear(probe, weight.detach()), rtol=1e-4, atol=1e-4):
        logger.warning("oneDNN prepacked linear disagrees with F.linear; not using it")
        return None
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """F.linear over a [rows, in] input, from `packed` when it is set and rows are many enough."""
    if packed is not None and x.dim() == 2 and x.shape[0] >= PACKED_MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward uses `packed` once `pack()` made it."""

    packed: torch.Tensor | None = None

    def pack(self) -> bool:
        self.packed = packed_weight(self.weight)
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_linear_weights(model: nn.Module) -> int:
    """Packs every `Linear` of `model` (and whatever else its `pack_weights` hook packs);
    returns how many weights were packed."""
    count = sum(m.pack() for m in model.modules() if isinstance(m, Linear))
    hook = getattr(model, "pack_weights", None)
    if hook is not None:
        count += hook()
    return count

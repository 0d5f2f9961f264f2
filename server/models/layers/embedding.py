"""Token embedding and the logits head (its own weight, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.models.layers.linear import Linear, LinearMethod
from server.models.layers.packed_gemm import GemmPolicy, PackedWeight, linear, packed_weight
from server.models.layers.weights import set_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = set_weight_loader(nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [rows, hidden_size] -> logits [rows, vocab_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None,
                 method: LinearMethod, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # A tuple, so the tied embedding is not registered twice as a submodule.
        self._tied: tuple[VocabEmbedding, ...] = (tied_to,) if tied_to is not None else ()
        self.proj = (None if tied_to is not None
                     else Linear(hidden_size, vocab_size, bias=False, method=method, dtype=dtype))
        self.packed: PackedWeight | None = None  # the tied head's copies

    def pack_tied(self, policy: GemmPolicy) -> int:
        """The tied head is no Linear: pack the embedding matrix for it."""
        if not self._tied:
            return 0
        self.packed = packed_weight(self._tied[0].weight, policy=policy)
        return int(self.packed is not None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(hidden)
        return linear(hidden, self._tied[0].weight, None, self.packed)

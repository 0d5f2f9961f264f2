"""Token embedding and the logits head (its own weight, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve_kernels import cpu_quant
from server.models.gguf import Q8Blocks
from server.models.layers.linear import Linear, LinearMethod
from server.models.layers.packed_gemm import GemmPolicy, PackedWeight, linear, packed_weight
from server.models.layers.quantized_linear import (
    Int8LinearMethod,
    dequantize,
    int8_form,
    kernel_runs,
    linear_q8,
)
from server.models.layers.weights import check_shape, default_weight_loader, set_weight_loader
from server.models.packed_int import IntBlocks


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = set_weight_loader(nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False), self._load)
        self.keeps_blocks = False  # set by a tied head, the only user of the blocks
        self.q8_blocks: Q8Blocks | None = None  # a GGUF file's block rows, for a tied head

    def _load(self, param: nn.Parameter, tensor: torch.Tensor | Q8Blocks | IntBlocks,
              shard_id=None) -> None:
        """The lookup takes float rows; a table of blocks is dequantized for it and, under a
        tied head, a GGUF file's blocks kept for its 8-bit GEMM."""
        if isinstance(tensor, (Q8Blocks, IntBlocks)):
            check_shape(tensor.shape, param.shape)
            self.q8_blocks = (tensor if self.keeps_blocks and isinstance(tensor, Q8Blocks)
                              else None)
            tensor = dequantize(tensor)
        default_weight_loader(param, tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [rows, hidden_size] -> logits [rows, vocab_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None,
                 method: LinearMethod, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # A tuple, so the tied embedding is not registered twice as a submodule.
        self._tied: tuple[VocabEmbedding, ...] = (tied_to,) if tied_to is not None else ()
        if tied_to is not None:
            tied_to.keeps_blocks = True
        self.proj = (None if tied_to is not None
                     else Linear(hidden_size, vocab_size, bias=False, method=method, dtype=dtype))
        self.method = method
        self.packed: PackedWeight | None = None  # the tied head's copies
        self.q8: torch.Tensor | None = None  # the tied head's 8-bit tiles

    def pack_tied(self, policy: GemmPolicy) -> int:
        """The tied head is no Linear: pack the embedding matrix for it, as 8-bit (or 4-bit)
        tiles where the method is 8-bit and the embedding came as blocks (or "int8" quantizes
        it)."""
        if not self._tied:
            return 0
        weight = self._tied[0].weight
        blocks, self._tied[0].q8_blocks = self._tied[0].q8_blocks, None  # tiles or float now
        if isinstance(self.method, Int8LinearMethod) and kernel_runs(weight.device,
                                                                    weight.shape[1]):
            if blocks is not None or self.method.quantize_floats:
                self.q8 = cpu_quant.pack_blocks(*int8_form(blocks if blocks is not None
                                                           else weight))
                return 0
        self.packed = packed_weight(weight, policy=policy)
        return int(self.packed is not None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(hidden)
        if self.q8 is not None:
            return linear_q8(hidden, self.q8, None, self._tied[0].weight.shape[0])
        return linear(hidden, self._tied[0].weight, None, self.packed)

"""Linear layers and the LinearMethod extension point.

A `LinearMethod` owns a linear layer's weights in one storage format: it creates them, loads
checkpoint tensors into them, repacks them for the CPU GEMMs, and computes the matmul. The
`quantization` config field names the method (layers/linear_methods.py). The
layers fix only the shapes: `Linear` [output_size, input_size], and `MergedLinear`, several
outputs side by side (q/k/v, gate/up) that the checkpoint stores as separate tensors (shards).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from server.models.layers.packed_gemm import GemmPolicy, PackedWeight, linear, packed_weight
from server.models.layers.weights import copy_weight, set_weight_loader

logger = logging.getLogger(__name__)


class LinearMethod(Protocol):
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        """Register the layer's parameters (each with its weight_loader and shard ids)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [rows, input_size] -> [rows, output_size]."""

    def pack(self, layer: Linear, policy: GemmPolicy) -> bool:
        """Make the CPU GEMMs' copies of the loaded weights; whether one was made."""


class UnquantizedLinearMethod:
    """Weights as they are in the checkpoint (fp32 / fp16 / bf16); CPU GEMMs from the copies
    and the measured choice of layers/packed_gemm.py."""

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        shards = tuple(range(len(layer.output_sizes))) if layer.merged else (None,)
        layer.weight = set_weight_loader(
            nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=dtype),
                         requires_grad=False), layer.load_shard, shards)
        layer.bias = None if not layer.has_bias else set_weight_loader(
            nn.Parameter(torch.empty(layer.output_size, dtype=dtype), requires_grad=False),
            layer.load_shard, shards)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(x, layer.weight, layer.bias, layer.packed)

    def pack(self, layer: Linear, policy: GemmPolicy) -> bool:
        layer.packed = packed_weight(layer.weight, layer.bias, policy)
        return layer.packed is not None


class Linear(nn.Module):
    """y = x W^T + b, W [output_size, input_size], in the format of `method`."""

    merged = False  # MergedLinear: the checkpoint fills the weight in shards 0..n-1
    weight: nn.Parameter  # the method's parameters; other methods add their own
    bias: nn.Parameter | None
    packed: PackedWeight | None = None  # set by the method's `pack`
    q8: torch.Tensor | None = None  # 8-bit tiles (layers/quantized_linear.py), else None
    q8_perm: torch.Tensor | None = None  # the input each column of the tiles takes (None: its own)
    blocks: tuple | None = None  # (values, scales, offsets) for the Triton block GEMM, else None

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 method: LinearMethod | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._create(input_size, [output_size], bias, method, dtype)

    def _create(self, input_size: int, output_sizes: Sequence[int], bias: bool,
                method: LinearMethod | None, dtype: torch.dtype | None) -> None:
        self.input_size, self.output_size = input_size, sum(output_sizes)
        self.output_sizes = list(output_sizes)
        self.has_bias = bias
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self, dtype or torch.get_default_dtype())

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """The weight_loader of this layer's parameters: shard `shard_id` (None: all of it)."""
        dest = param.data
        if shard_id is not None:
            dest = dest.narrow(0, sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id])
        copy_weight(dest, tensor)

    def pack(self, policy: GemmPolicy | None = None) -> bool:
        return self.method.pack(self, policy or GemmPolicy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_sizes={self.output_sizes}, "
                f"bias={self.has_bias}, method={type(self.method).__name__}")


class MergedLinear(Linear):
    """Several projections of the same input in one GEMM: output shard i is `output_sizes[i]`
    rows of W, loaded from its own checkpoint tensor (shard id i)."""

    merged = True

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 method: LinearMethod | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self._create(input_size, output_sizes, bias, method, dtype)


def pack_linear_weights(model: nn.Module, budget_bytes: int | None = None,
                        policy: GemmPolicy | None = None) -> int:
    """Packs every `Linear` of `model` (and whatever else its `pack_weights(policy)` hook
    packs); returns how many weights were packed. A weight keeps at most two copies (its own
    GEMM's and one library's): without room for two within `budget_bytes` the own copies are
    left out, and without room for one nothing is packed."""
    policy = policy or GemmPolicy()
    if budget_bytes is not None:
        needed = sum(p.nbytes for p in model.parameters() if p.dim() == 2)
        if policy.own and 2 * needed > budget_bytes:
            logger.warning("no compiled-GEMM copies: %.1f GiB would exceed the %.1f GiB "
                           "budget", 2 * needed / 2**30, budget_bytes / 2**30)
            policy = dataclasses.replace(policy, own=False)
        if needed > budget_bytes:
            logger.warning("not prepacking linear weights: %.1f GiB of copies would exceed the "
                           "%.1f GiB budget; GEMMs use the plain weights", needed / 2**30,
                           budget_bytes / 2**30)
            return 0
    count = sum(m.pack(policy) for m in model.modules() if isinstance(m, Linear))
    hook = getattr(model, "pack_weights", None)
    if hook is not None:
        count += hook(policy)
    return count

"""8-bit linear weights: a LinearMethod whose layers keep blocks of 32 int8 values along the
input (a scale and an offset each; a layer of 4-bit values as nibbles) and compute with
kernels/cpu_quant.py's GEMM, never with a dequantized copy of the matrix.

Two modes, one method. "gguf": the blocks a GGUF file holds (`Q8Blocks` from models/gguf.py;
Q8_0, Q4_0, Q4_1, Q4_K, Q5_K exactly, Q6_K requantized: cpu_quant.int8_blocks) stay blocks;
float tensors stay float. "int8": float tensors are quantized to the same
blocks at load as well (weight-only, one scale per 32 values). A layer is decided when its last
shard arrives: its q, k and v (or gate and up) become one block matrix when every shard is
blocks (of any of these types: the tiles carry a scale and an offset per block); otherwise,
and where the kernel cannot run (no CPU, an input size that is no multiple of 32), the layer
keeps a float weight in the model's dtype, dequantized where it must be.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from pagedserve_kernels import cpu_quant
from server.models.gguf import Q8Blocks
from server.models.layers.linear import Linear, UnquantizedLinearMethod
from server.models.layers.packed_gemm import GemmPolicy
from server.models.layers.weights import check_shape, set_weight_loader

logger = logging.getLogger(__name__)


class Int8LinearMethod:
    gguf_kinds = cpu_quant.KINDS  # the GGUF tensor types this method computes with as blocks

    def __init__(self, quantize_floats: bool) -> None:
        self.quantize_floats = quantize_floats
        self._pending: dict[int, dict[Any, Any]] = {}  # id(layer) -> shards not yet assembled

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, dtype)
        # The weight's storage comes when its last shard arrives (float or blocks).
        layer.weight = set_weight_loader(
            nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False),
            functools.partial(self._load, layer), layer.weight.shard_ids)  # type: ignore
        layer.q8 = None
        self._pending[id(layer)] = {}

    def _load(self, layer: Linear, param: nn.Parameter, tensor: Any, shard_id: Any) -> None:
        rows = layer.output_size if shard_id is None else layer.output_sizes[shard_id]
        check_shape(tensor.shape, (rows, layer.input_size))
        pending = self._pending[id(layer)]
        pending[shard_id] = tensor
        shard_ids = param.shard_ids  # type: ignore[attr-defined]
        if len(pending) == len(shard_ids):
            self._assemble(layer, param, [pending.pop(s) for s in shard_ids])

    def _assemble(self, layer: Linear, param: nn.Parameter, parts: list) -> None:
        runs = kernel_runs(param.device, layer.input_size)
        if runs and all(isinstance(p, Q8Blocks) or self.quantize_floats for p in parts):
            forms = [int8_form(p) for p in parts]
            scales, values = torch.cat([f[0] for f in forms]), torch.cat([f[1] for f in forms])
            mins = (None if all(f[2] is None for f in forms) else torch.cat(
                [f[2] if f[2] is not None else torch.zeros_like(f[0]) for f in forms]))
            layer.q8 = cpu_quant.pack_blocks(scales, values, mins)
            return
        if any(isinstance(p, Q8Blocks) for p in parts):
            logger.warning("a %dx%d projection's blocks are dequantized: %s", layer.input_size,
                           layer.output_size, "some of its shards are float tensors" if runs
                           else "the 8-bit GEMM runs on CPU only, on inputs of a multiple of 32")
        param.data = torch.cat([dequantize(p) if isinstance(p, Q8Blocks) else p
                                for p in parts]).to(param.device, param.dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.q8 is None:
            return UnquantizedLinearMethod().apply(layer, x)
        return linear_q8(x, layer.q8, layer.bias, layer.output_size)

    def pack(self, layer: Linear, policy: GemmPolicy) -> bool:
        if layer.q8 is not None:
            return False
        return UnquantizedLinearMethod().pack(layer, policy)


def int8_form(weight: torch.Tensor | Q8Blocks
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """cpu_quant.int8_blocks of a file's blocks, or of a float weight quantized to Q8_0."""
    if isinstance(weight, Q8Blocks):
        return cpu_quant.int8_blocks(weight.kind, weight.blocks)
    return cpu_quant.int8_blocks("Q8_0", cpu_quant.quantize_q8_0(weight))


def is_quantized(module: nn.Module) -> bool:
    """Whether a linear layer computes from 8-bit blocks."""
    return getattr(module, "q8", None) is not None


def kernel_runs(device: torch.device, in_features: int) -> bool:
    """Whether the 8-bit GEMM can take a weight: on CPU, inputs a multiple of 32."""
    return (device.type == "cpu" and in_features % cpu_quant.BLOCK == 0
            and cpu_quant.available())


def linear_q8(x: torch.Tensor, q8: torch.Tensor, bias: torch.Tensor | None,
              out_features: int) -> torch.Tensor:
    """F.linear from pack_blocks' tiles, in x's dtype (the GEMM computes in fp32)."""
    out = cpu_quant.linear_q8_0(x.to(torch.float32).contiguous(), q8,
                                None if bias is None else bias.to(torch.float32), out_features)
    return out.to(x.dtype)


def dequantize(blocks: Q8Blocks) -> torch.Tensor:
    """The fp32 weight a file's blocks hold."""
    return cpu_quant.dequantize(blocks.kind, blocks.blocks)

"""8-bit linear weights: a LinearMethod whose layers keep blocks of 32 int8 values along the
input (a scale and an offset each; a layer of 4-bit values as nibbles) and compute with them,
never with a dequantized copy of the matrix: on CPU with kernels/cpu_quant.py's GEMM over its
tiles, on CUDA with the Triton dequantize-GEMM (kernels/quant_gemm.py, `ops.linear_blocks`).

Two modes, one method. "gguf", "gptq", "awq": the blocks a checkpoint holds stay blocks (a
GGUF file's `Q8Blocks` from models/gguf.py: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K exactly, Q6_K
requantized, cpu_quant.int8_blocks; a GPTQ or AWQ layer's `IntBlocks` from
models/packed_int.py, exactly); float tensors stay float. "int8": float tensors are quantized
to the same blocks at load as well (weight-only, one scale per 32 values). A layer is decided
when its last shard arrives: its q, k and v (or gate and up) become one block matrix when every
shard is blocks (of any of these types: the tiles carry a scale and an offset per block);
otherwise, and where no kernel takes it (an input size that is no multiple of 32, a CPU GEMM
that did not build), the layer keeps a float weight in the model's dtype, dequantized where
it must be. A GPTQ act-order layer's blocks run over its inputs sorted by group: `q8_perm`
gathers them (its shards must agree on it, as they do when quantized from the same inputs).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from pagedserve_kernels import cpu_quant, ops
from server.models.gguf import Q8Blocks
from server.models.layers.linear import Linear, UnquantizedLinearMethod
from server.models.layers.packed_gemm import GemmPolicy
from server.models.layers.weights import check_shape, set_weight_loader
from server.models.packed_int import IntBlocks

logger = logging.getLogger(__name__)


class Int8LinearMethod:
    gguf_kinds = cpu_quant.KINDS  # the GGUF tensor types this method computes with as blocks

    def __init__(self, quantize_floats: bool, gemm: str = "auto") -> None:
        self.quantize_floats = quantize_floats
        self.gemm = gemm  # "auto"; "triton": the Triton GEMM on any device (the tests' CPU)
        self._pending: dict[int, dict[Any, Any]] = {}  # id(layer) -> shards not yet assembled

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, dtype)
        # The weight's storage comes when its last shard arrives (float or blocks).
        layer.weight = set_weight_loader(
            nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False),
            functools.partial(self._load, layer), layer.weight.shard_ids)  # type: ignore
        layer.q8 = layer.q8_perm = layer.blocks = None
        self._pending[id(layer)] = {}

    def _load(self, layer: Linear, param: nn.Parameter, tensor: Any, shard_id: Any) -> None:
        rows = layer.output_size if shard_id is None else layer.output_sizes[shard_id]
        check_shape(tensor.shape, (rows, layer.input_size))
        pending = self._pending[id(layer)]
        pending[shard_id] = tensor
        shard_ids = param.shard_ids  # type: ignore[attr-defined]
        if len(pending) == len(shard_ids):
            self._assemble(layer, param, [pending.pop(s) for s in shard_ids])

    def _kernel(self, device: torch.device, in_features: int) -> str | None:
        """What computes with a layer's blocks: "cpu" (cpu_quant's tiles), "triton"
        (ops.linear_blocks on CUDA), None (no kernel: the layer is dequantized)."""
        if in_features % cpu_quant.BLOCK:
            return None
        if self.gemm == "triton" or device.type == "cuda":
            return "triton"
        return "cpu" if kernel_runs(device, in_features) else None

    def _assemble(self, layer: Linear, param: nn.Parameter, parts: list) -> None:
        kernel = self._kernel(param.device, layer.input_size)
        perms = [p.perm if isinstance(p, IntBlocks) else None for p in parts]
        if not all(_same(perms[0], q) for q in perms):
            kernel = None
            logger.warning("a %dx%d projection's shards take their inputs in different orders "
                           "(GPTQ act order)", layer.input_size, layer.output_size)
        if kernel and all(is_blocks(p) or self.quantize_floats for p in parts):
            forms = [int8_form(p) for p in parts]
            scales, values = torch.cat([f[0] for f in forms]), torch.cat([f[1] for f in forms])
            mins = (None if all(f[2] is None for f in forms) else torch.cat(
                [f[2] if f[2] is not None else torch.zeros_like(f[0]) for f in forms]))
            perm = perms[0]
            layer.q8_perm = None if perm is None else perm.to(param.device)
            if kernel == "cpu":
                layer.q8 = cpu_quant.pack_blocks(scales, values, mins)
                return
            four = int(values.min()) >= 0 and int(values.max()) <= 15
            layer.blocks = tuple(None if t is None else t.to(param.device) for t in (
                ops.pack_nibbles(values) if four else values, scales, mins))
            return
        if any(is_blocks(p) for p in parts):
            logger.warning("a %dx%d projection's blocks are dequantized: %s", layer.input_size,
                           layer.output_size, "some of its shards are float tensors" if kernel
                           else "no block GEMM takes it here (inputs no multiple of 32, or the "
                           "CPU's 8-bit GEMM did not build)")
        param.data = torch.cat([dequantize(p) if is_blocks(p) else p
                                for p in parts]).to(param.device, param.dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.q8 is None and layer.blocks is None:
            return UnquantizedLinearMethod().apply(layer, x)
        if layer.q8_perm is not None:
            x = x.index_select(-1, layer.q8_perm)
        if layer.q8 is not None:
            return linear_q8(x, layer.q8, layer.bias, layer.output_size)
        assert layer.blocks is not None
        values, scales, mins = layer.blocks
        return ops.linear_blocks(x.reshape(-1, layer.input_size), values, scales, mins,
                                 layer.bias, backend="triton").reshape(*x.shape[:-1], -1)

    def pack(self, layer: Linear, policy: GemmPolicy) -> bool:
        if layer.q8 is not None or layer.blocks is not None:
            return False
        return UnquantizedLinearMethod().pack(layer, policy)


def int8_form(weight: torch.Tensor | Q8Blocks | IntBlocks
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scales, values, offsets) of a checkpoint's blocks, or of a float weight quantized to
    Q8_0."""
    if isinstance(weight, IntBlocks):
        return weight.scales, weight.values, weight.mins()
    if isinstance(weight, Q8Blocks):
        return cpu_quant.int8_blocks(weight.kind, weight.blocks)
    return cpu_quant.int8_blocks("Q8_0", cpu_quant.quantize_q8_0(weight))


def is_blocks(weight: Any) -> bool:
    """Whether a checkpoint tensor came as blocks (a GGUF file's, or a GPTQ/AWQ layer's)."""
    return isinstance(weight, (Q8Blocks, IntBlocks))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


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


def dequantize(blocks: Q8Blocks | IntBlocks) -> torch.Tensor:
    """The fp32 weight a checkpoint's blocks hold."""
    if isinstance(blocks, IntBlocks):
        return blocks.dequantize()
    return cpu_quant.dequantize(blocks.kind, blocks.blocks)

"""The model contract: what a model family implements so the runner, the loader and the CPU
paths can use it. A family is one file in server/models/ and a line in registry.py.

A family subclasses `CausalLM` and provides:

- `parse_config(raw)` (classmethod): its config.json -> `ArchConfig`, rejecting what it cannot
  run with a ModelLoadError that names the field;
- `__init__(cfg, options)`: its modules, built from models/layers/ with `options.dtype`, every
  linear layer in `options.linear_method`'s format and every element-wise step on
  `options.kernel_backend`; parameters are created empty and filled by `load_weights`;
- `forward(input_ids, positions, kv_caches, md) -> hidden [num_tokens, hidden_size]`: the whole
  computation, described once; it never asks which device paths exist;
- `compute_logits(hidden) -> [rows, vocab_size]`;
- `stacked_params`: checkpoint name fragment -> (parameter name fragment, shard id), for the
  weights it fuses (q/k/v into qkv_proj, say); each parameter's own `weight_loader`
  (layers/weights.py) places a shard, so stacked experts need nothing more here;
- optionally `export_decoder()`: the Llama-shaped decoder as the compiled CPU decode step reads
  it (model_runner/cpu.py owns that step); None, the default, runs decode layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.errors import ModelLoadError
from server.models.layers.embedding import VocabEmbedding
from server.models.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod
from server.models.layers.packed_gemm import GemmPolicy
from server.models.layers.rotary import RotaryEmbedding
from server.models.layers.weights import ShapeMismatch, shard_ids_of, weight_loader_of

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]


@dataclass(frozen=True)
class ModelOptions:
    max_position: int  # rotary tables cover positions below this
    dtype: torch.dtype = torch.float32
    linear_method: LinearMethod = field(default_factory=UnquantizedLinearMethod)
    kernel_backend: str = "auto"  # pagedserve_kernels.ops.BACKENDS: norms, SiLU-and-mul, rotary


@dataclass(frozen=True)
class DecoderLayerExport:
    input_norm: torch.Tensor
    qkv: Linear  # the CPU step reads the projections' packed copies
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass(frozen=True)
class DecoderExport:
    """A pre-norm decoder with fused QKV, rotary, GQA attention over the paged cache and a gated
    SiLU MLP, then a final RMSNorm: what kernels.cpu_decoder computes in one call."""
    embed_tokens: VocabEmbedding
    rotary: RotaryEmbedding
    layers: list[DecoderLayerExport]
    final_norm: torch.Tensor
    eps: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None


class CausalLM(nn.Module):
    stacked_params: ClassVar[dict[str, tuple[str, Any]]] = {}
    # Checkpoint tensors a family knows and does not need (name suffixes).
    ignored_weights: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__()
        self.config = cfg
        self.options = options

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ArchConfig:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], md: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export_decoder(self) -> DecoderExport | None:
        return None

    def pack_weights(self, policy: GemmPolicy) -> int:
        """Pack what is not a layers.linear.Linear for the CPU GEMMs (a tied head, say)."""
        return 0

    def skips_weight(self, name: str) -> bool:
        return name.endswith(self.ignored_weights)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[tuple[str, Any]]:
        """Hand each checkpoint tensor (a torch.Tensor, or blocks for a LinearMethod that takes
        them: gguf.Q8Blocks, packed_int.IntBlocks) to its parameter's weight_loader; returns the
        (parameter, shard id) pairs filled."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, Any]] = set()
        for name, tensor in weights:
            if self.skips_weight(name):
                continue
            target, shard_id = self.parameter_for(name)
            param = params.get(target)
            if param is None:
                raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
            try:
                weight_loader_of(param)(param, tensor, shard_id)
            except ShapeMismatch as e:
                raise ModelLoadError(f"shape mismatch for {name!r}: {e}") from None
            loaded.add((target, shard_id))
        return loaded

    def parameter_for(self, name: str) -> tuple[str, Any]:
        """The parameter (and shard id) a checkpoint tensor fills."""
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            stacked = self.stacked_params.get(parts[i])
            if stacked is not None:
                return ".".join(parts[:i] + [stacked[0]] + parts[i + 1:]), stacked[1]
        return name, None

    def expected_weights(self) -> set[tuple[str, Any]]:
        return {(name, shard) for name, p in self.named_parameters() for shard in shard_ids_of(p)}

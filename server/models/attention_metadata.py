"""Per-step attention metadata for the flattened batch, passed explicitly to the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve_kernels.torch_attention import AttentionPlan


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset
    attention_backend: str = "auto"
    # ops.attention_plan(...) of this step, shared by the layers; None where Triton runs.
    plan: AttentionPlan | None = None

"""Self-attention of a Llama-family decoder layer: fused QKV projection, optional q/k RMSNorm,
rotary, the KV cache write and paged attention (kernels entry points), output projection."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve_kernels import ops
from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.base import ModelOptions
from server.models.layers.linear import Linear, MergedLinear
from server.models.layers.norm import RMSNorm

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin at the step's positions: [tokens, 1, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        method, dtype = options.linear_method, options.dtype
        self.backend = options.kernel_backend
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bias=cfg.qkv_bias, method=method, dtype=dtype)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias, method=method,
                             dtype=dtype)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, self.backend)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, self.backend)
        self.scale = self.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, rope: Rope, x: torch.Tensor, kv_cache: KVCache,
                md: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads,
                                                     self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qkv[:, :self.q_size + self.kv_size].split([self.q_size, self.kv_size], -1)
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            q = ops.rotary(q, *rope, backend=self.backend)  # the norms' outputs: their own
            k = ops.rotary(k, *rope, backend=self.backend)
        else:  # q and k rotated in one go: their heads are adjacent columns of qkv
            qk = qkv[:, :self.q_size + self.kv_size].view(
                num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = ops.rotary(qk, *rope, backend=self.backend)  # may write qkv, its own
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(k, v, key_cache, value_cache, md.slot_mapping,
                                  backend=md.attention_backend)
        out = ops.paged_attention(q, key_cache, value_cache, md.block_table, md.seq_lens,
                                      md.query_start_loc, self.scale,
                                      sliding_window=self.sliding_window,
                                      backend=md.attention_backend, plan=md.plan)
        return self.o_proj(out.view(num_tokens, self.q_size))

"""Llama: a pre-norm decoder of the shared layers (models/layers/). Mistral, Qwen2 and Qwen3
are this decoder with their own config reading (their files)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.base import CausalLM, DecoderExport, DecoderLayerExport, KVCache, ModelOptions
from server.models.layers.attention import Attention, Rope
from server.models.layers.embedding import LMHead, VocabEmbedding
from server.models.layers.mlp import GatedMLP
from server.models.layers.norm import RMSNorm
from server.models.layers.packed_gemm import GemmPolicy
from server.models.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, options)
        self.mlp = GatedMLP(cfg, options)
        norm = (cfg.hidden_size, cfg.rms_norm_eps, options.dtype, options.kernel_backend)
        self.input_layernorm = RMSNorm(*norm)
        self.post_attention_layernorm = RMSNorm(*norm)

    def forward(self, rope: Rope, h: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous layer's MLP output (the embeddings, for the first layer); residual:
        the sum of everything before it (None for the first layer), updated in place.
        Returns this layer's MLP output and the residual stream; their sum is the layer's
        output in the usual `h + attn(norm(h))`, `h + mlp(norm(h))` form, added in that order."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x = self.input_layernorm.add_forward(h, residual)
        x = self.post_attention_layernorm.add_forward(self.self_attn(rope, x, kv_cache, md),
                                                      residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, options.dtype)
        # One rotary table; its cos/sin at this step's positions are shared by every layer.
        self.rotary = RotaryEmbedding(cfg.head_dim, options.max_position, cfg.rope_theta,
                                      cfg.rope_type, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, options) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.dtype,
                            options.kernel_backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], md: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(rope, h, residual, kv_cache, md)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm.add_forward(h, residual)


class LlamaForCausalLM(CausalLM):
    stacked_params = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ArchConfig, options: ModelOptions) -> None:
        super().__init__(cfg, options)
        self.model = LlamaModel(cfg, options)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              self.model.embed_tokens if cfg.tie_word_embeddings else None,
                              options.linear_method, options.dtype)

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_dict(raw)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def pack_weights(self, policy: GemmPolicy) -> int:
        return self.lm_head.pack_tied(policy)

    def skips_weight(self, name: str) -> bool:
        # Tied embeddings: some checkpoints still carry the head's copy.
        return super().skips_weight(name) or (name == "lm_head.weight"
                                               and self.config.tie_word_embeddings)

    def parameter_for(self, name: str) -> tuple[str, Any]:
        if name == "lm_head.weight":
            return "lm_head.proj.weight", None
        return super().parameter_for(name)

    def export_decoder(self) -> DecoderExport:
        layers = cast(list[DecoderLayer], list(self.model.layers))
        exports = [DecoderLayerExport(
            input_norm=layer.input_layernorm.weight,
            qkv=layer.self_attn.qkv_proj,
            q_norm=None if layer.self_attn.q_norm is None else layer.self_attn.q_norm.weight,
            k_norm=None if layer.self_attn.k_norm is None else layer.self_attn.k_norm.weight,
            o=layer.self_attn.o_proj, post_norm=layer.post_attention_layernorm.weight,
            gate_up=layer.mlp.gate_up_proj, down=layer.mlp.down_proj) for layer in layers]
        cfg = self.config
        return DecoderExport(self.model.embed_tokens, self.model.rotary, exports,
                             self.model.norm.weight, eps=self.model.norm.eps,
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, scale=cfg.head_dim ** -0.5,
                             sliding_window=cfg.sliding_window)

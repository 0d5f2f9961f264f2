"""Llama-family decoder: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

Projections are fused (qkv_proj, gate_up_proj); the loader splits checkpoint tensors into them.
Attention goes through the `kernels` entry points over the paged KV cache.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import cpu_decoder, cpu_fused
from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.layers.linear import Linear, PackedWeight, linear, packed_weight
from server.models.layers.norm import RMSNorm
from server.models.layers.rotary import RotaryEmbedding, rotate

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin at the step's positions: [tokens, 1, head_dim]


class Attention(nn.Module):
    fused = False  # rotary through kernels.cpu_fused (set by use_fused_cpu_ops)

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
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
            q = rotate(self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim)), *rope)
            k = rotate(self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim)), *rope)
        else:  # q and k rotated in one go: their heads are adjacent columns of qkv
            qk = qkv[:, :self.q_size + self.kv_size].view(
                num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            if self.fused and cpu_fused.supports(qkv):
                qk = cpu_fused.rotary_(qk, *rope)  # in place: qkv is this call's own
            else:
                qk = rotate(qk, *rope)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        key_cache, value_cache = kv_cache
        kernels.reshape_and_cache(k, v, key_cache, value_cache, md.slot_mapping,
                                  backend=md.attention_backend)
        out = kernels.paged_attention(q, key_cache, value_cache, md.block_table, md.seq_lens,
                                      md.query_start_loc, self.scale,
                                      sliding_window=self.sliding_window,
                                      backend=md.attention_backend, plan=md.plan)
        return self.o_proj(out.view(num_tokens, self.q_size))


class MLP(nn.Module):
    fused = False  # SiLU-and-mul through kernels.cpu_fused (set by use_fused_cpu_ops)

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                      bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused and cpu_fused.supports(gate_up):
            return self.down_proj(cpu_fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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


COMPILED_DECODE_ROWS = 64  # decode-only steps of up to this many rows: kernels.cpu_decoder


class LlamaModel(nn.Module):
    # Decode-only steps of 1..COMPILED_DECODE_ROWS rows run every layer in one
    # kernels.cpu_decoder call (set by use_compiled_decode); everything else goes layer by layer.
    compiled_decode = False

    def __init__(self, cfg: ArchConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One rotary table; its cos/sin at this step's positions are shared by every layer.
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_type,
                                      cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._decoder: tuple[list[KVCache], cpu_decoder.DecoderTensors] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], md: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, h.dtype)
        if (self.compiled_decode and input_ids.shape[0] <= COMPILED_DECODE_ROWS
                and getattr(md.plan, "all_decode", False) and getattr(md.plan, "native", False)):
            attn = cast(DecoderLayer, self.layers[0]).self_attn
            return cpu_decoder.decode_step(self._decoder_tensors(kv_caches), h, *rope,
                                           md.slot_mapping, md.block_table, md.seq_lens,
                                           attn.scale, attn.sliding_window)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(rope, h, residual, kv_cache, md)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm.add_forward(h, residual)

    def _decoder_tensors(self, kv_caches: list[KVCache]) -> cpu_decoder.DecoderTensors:
        """The compiled step's view of the weights and these caches, made once per cache list."""
        if self._decoder is not None and self._decoder[0] is kv_caches:
            return self._decoder[1]
        layers = []
        decoder_layers = cast(list[DecoderLayer], list(self.layers))
        for layer, (key_cache, value_cache) in zip(decoder_layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(cpu_decoder.LayerTensors(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=_small_copy(attn.qkv_proj), qkv_bias=_bias(attn.qkv_proj),
                q_norm=None if attn.q_norm is None else attn.q_norm.weight.detach(),
                k_norm=None if attn.k_norm is None else attn.k_norm.weight.detach(),
                o=_small_copy(attn.o_proj), o_bias=_bias(attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=_small_copy(mlp.gate_up_proj), gate_up_bias=_bias(mlp.gate_up_proj),
                down=_small_copy(mlp.down_proj), down_bias=_bias(mlp.down_proj),
                key_cache=key_cache, value_cache=value_cache))
        first = decoder_layers[0].self_attn
        tensors = cpu_decoder.DecoderTensors(
            layers, self.norm.weight.detach(), num_heads=first.num_heads,
            num_kv_heads=first.num_kv_heads, head_dim=first.head_dim, eps=self.norm.eps)
        self._decoder = (kv_caches, tensors)
        return tensors


def _small_copy(module: Linear) -> torch.Tensor:
    assert module.packed is not None and module.packed.small is not None
    return module.packed.small


def _bias(module: Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def use_compiled_decode(model: nn.Module) -> bool:
    """Run decode-only steps of up to COMPILED_DECODE_ROWS rows through kernels.cpu_decoder,
    where it applies: an fp32 CPU model whose projections all have their small-row copies
    (pack_linear_weights with small=True), and the kernel built. Returns whether it was
    switched on."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, LlamaModel) or len(inner.layers) == 0:
        return False
    weight = inner.embed_tokens.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    norms = [m for m in inner.modules() if isinstance(m, RMSNorm)]
    if any(m.weight.dtype != torch.float32 for m in norms):
        return False
    if any(m.packed is None or m.packed.small is None
           for m in inner.layers.modules() if isinstance(m, Linear)):
        return False
    if not cpu_decoder.available():
        return False
    inner.compiled_decode = True
    return True


def use_fused_cpu_ops(model: nn.Module) -> int:
    """Route the norms, SiLU-and-mul and rotary of fp32 CPU activations through
    kernels.cpu_fused (the caller checked it is available); returns the modules switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, RMSNorm | MLP | Attention):
            module.fused = True
            switched += 1
    return switched


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensor suffix -> (our fused parameter suffix, shard index).
    fused_params = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ArchConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_position)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        self._tied_packed: PackedWeight | None = None

    def shard_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                    cfg.num_kv_heads * cfg.head_dim]
        return [cfg.intermediate_size, cfg.intermediate_size]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)

    def pack_weights(self, small: bool = False) -> int:
        """The tied logits head is no Linear module: pack the embedding matrix for it."""
        if self.lm_head is not None:
            return 0
        self._tied_packed = packed_weight(self.model.embed_tokens.weight, small=small)
        return int(self._tied_packed is not None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return linear(hidden, self.model.embed_tokens.weight, None, self._tied_packed)

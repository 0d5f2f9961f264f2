"""Rotary position embedding (half-split layout), with `default` and `llama3` frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from server.models.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def _inv_freq(head_dim: int, theta: float, rope_type: str,
              scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ModelLoadError(f"rope scaling type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    assert scaling is not None
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, rope_type: str = "default",
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._args = (head_dim, max_position, theta, rope_type, scaling)
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        self.build_tables()

    def build_tables(self, device: torch.device | None = None) -> None:
        """(Re)compute the fp32 cos/sin tables, e.g. after the module was made on `meta`."""
        head_dim, max_position, theta, rope_type, scaling = self._args
        inv_freq = _inv_freq(head_dim, theta, rope_type, scaling).to(device)
        positions = torch.arange(max_position, dtype=torch.float, device=device)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache, self.sin_cache = emb.cos(), emb.sin()

    def cos_sin(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions`, [num_tokens, 1, head_dim]: once per step, for every
        layer's kernels.rotary."""
        return (self.cos_cache[positions].to(dtype).unsqueeze(1),
                self.sin_cache[positions].to(dtype).unsqueeze(1))


"""Qwen3: the Llama decoder with RMSNorm over each query and key head before rotary."""

from __future__ import annotations

from typing import Any

from server.models.arch_config import ArchConfig
from server.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_dict(raw, qk_norm=True)

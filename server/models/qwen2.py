"""Qwen2: the Llama decoder with a bias on the q/k/v projections (none on the output)."""

from __future__ import annotations

from typing import Any

from server.models.arch_config import ArchConfig
from server.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_dict(raw, qkv_bias=True, o_bias=False)

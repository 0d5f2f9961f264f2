"""Mistral: the Llama decoder with sliding-window attention."""

from __future__ import annotations

from typing import Any

from server.models.arch_config import ArchConfig
from server.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ArchConfig:
        window = raw.get("sliding_window")
        return ArchConfig.from_dict(raw, sliding_window=int(window) if window else None)

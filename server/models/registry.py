"""Architecture name (config.json's `architectures[0]`) -> model class (models/base.py)."""

from __future__ import annotations

from pathlib import Path

from server.models.arch_config import ArchConfig, architecture_of, read_config_json
from server.models.base import CausalLM
from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf, open_gguf
from server.models.llama import LlamaForCausalLM
from server.models.mistral import MistralForCausalLM
from server.models.qwen2 import Qwen2ForCausalLM
from server.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def resolve_model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None


def parse_arch_config(raw: dict) -> ArchConfig:
    """config.json's contents, read by the family that config names."""
    return resolve_model_class(architecture_of(raw)).parse_config(raw)


def read_arch_config(model_dir: Path) -> ArchConfig:
    """The config of a model directory, or of a GGUF file (or the directory holding one)."""
    gguf_file = find_gguf(model_dir)
    return parse_arch_config(open_gguf(gguf_file).config() if gguf_file is not None
                             else read_config_json(model_dir))

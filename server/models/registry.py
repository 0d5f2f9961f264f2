"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from server.models.errors import ModelLoadError
from server.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def resolve_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None

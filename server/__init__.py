"""pagedserve: an OpenAI-compatible LLM inference server with a paged KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from server.engine.llm import LLM
    from server.outputs import CompletionOutput, RequestOutput
    from server.sampling_params import SamplingParams, StructuredOutputsParams

_LAZY = {
    "LLM": "server.engine.llm",
    "SamplingParams": "server.sampling_params",
    "StructuredOutputsParams": "server.sampling_params",
    "RequestOutput": "server.outputs",
    "CompletionOutput": "server.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "__version__"]

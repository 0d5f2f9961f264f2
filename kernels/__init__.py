"""Attention over a paged KV cache. Imports torch only (triton arrives with the GPU kernels).

Every entry point takes `backend`: "auto" picks the best implementation for the tensors' device
(today the torch path everywhere), "torch" forces the torch path.
"""

from __future__ import annotations

import torch

from kernels import reference

_BACKENDS = ("auto", "torch")


def _resolve(backend: str, tensor: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    return "torch"


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, backend: str = "auto"):
    _resolve(backend, key)
    return reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                    scale, out=None, sliding_window=None, backend: str = "auto"):
    _resolve(backend, query)
    return reference.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                                     query_start_loc, scale, out=out,
                                     sliding_window=sliding_window)


__all__ = ["paged_attention", "reshape_and_cache", "reference"]

"""The kernels' entry points (`pagedserve_kernels.ops`): attention over a paged KV cache and the
layer ops. Imports torch and, when installed, triton.

Every entry point takes `backend`: "auto" (CUDA tensors -> Triton; anything else -> "cpu" when
the compiled CPU kernels build on this machine, else "torch"), "triton" (forces the Triton
kernels; on CPU tensors they run under TRITON_INTERPRET=1), "torch" (kernels/torch_attention.py,
torch ops only) or "cpu" (the torch path with fp32 decodes in the compiled kernel of
kernels/cpu_attention.py; falls back to "torch" where that cannot be built).
kernels/reference.py is the plain reference the tests compare everything with.
"""

from __future__ import annotations

import torch

from pagedserve_kernels import cpu_attention, cpu_fused, cpu_linear, reference, torch_attention
from pagedserve_kernels.layer_ops import rms_norm, rotary, silu_and_mul

try:  # the Triton modules; bound to private names, the entry points below keep the public ones
    from pagedserve_kernels import paged_attention as _triton_attention
    from pagedserve_kernels import quant_gemm as _triton_quant
    from pagedserve_kernels import reshape_and_cache as _triton_cache
except ImportError:  # no triton: the torch path only
    _triton_attention = _triton_cache = _triton_quant = None  # type: ignore[assignment]

BACKENDS = ("auto", "torch", "cpu", "triton")


def _resolve(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if tensor.is_cuda and _triton_attention is not None else "cpu"
    if backend == "triton" and _triton_attention is None:
        raise ValueError("backend 'triton' needs the triton package, which is not installed")
    if backend == "cpu" and (tensor.is_cuda or not cpu_attention.available()):
        backend = "torch"
    return backend


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                      backend: str = "auto") -> None:
    """Write K/V `[num_tokens, num_kv_heads, head_dim]` into the caches
    `[num_blocks, block_size, num_kv_heads, head_dim]` at `slot_mapping` (negative: skip)."""
    if _resolve(backend, key) == "triton":
        return _triton_cache.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    return torch_attention.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def attention_plan(block_table, seq_lens, query_start_loc, block_size: int,
                   sliding_window: int | None, backend: str = "auto",
                   native_prefill_len: int | None = None):
    """What the torch path's calls of one step share (block ids, masks), built once for all
    layers and passed back as `paged_attention(..., plan=)`; None where Triton runs.
    `native_prefill_len` (backend cpu): the compiled kernel takes the prompt rows of sequences
    of up to this many tokens, SDPA the longer ones (None: the kernel takes all)."""
    resolved = _resolve(backend, block_table)
    if resolved == "triton":
        return None
    return torch_attention.build_plan(block_table, seq_lens, query_start_loc, block_size,
                                      sliding_window, native=resolved == "cpu",
                                      native_prefill_len=native_prefill_len)


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                    scale, out=None, sliding_window=None, backend: str = "auto",
                    num_splits: int | None = None, plan=None):
    """Causal attention of a flattened batch over the paged cache; see kernels.reference.
    `num_splits` (Triton only): None picks split-KV automatically, 1 turns it off.
    `plan` (torch only): `attention_plan(...)` of this batch."""
    resolved = _resolve(backend, query)
    if resolved == "triton":
        return _triton_attention.paged_attention(
            query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
            out=out, sliding_window=sliding_window, num_splits=num_splits)
    if plan is None and resolved == "cpu":
        plan = torch_attention.build_plan(block_table, seq_lens, query_start_loc,
                                          key_cache.shape[1], sliding_window, native=True)
    return torch_attention.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                                           query_start_loc, scale, out=out,
                                           sliding_window=sliding_window, plan=plan)


def linear_blocks(x, values, scales, mins=None, bias=None, backend: str = "auto"):
    """x [M, K] @ w^T (+ bias) in x's dtype, w in blocks of 32 values along K: d * q + m (int8
    values [N, K], or 4-bit nibbles uint8 [N, K / 2] as `pack_nibbles` lays them; fp16 scales
    and offsets [N, K / 32]). Triton's dequantize-GEMM on CUDA (kernels/quant_gemm.py), else
    the torch reference. (The CPU's GEMM on these blocks is kernels/cpu_quant.py's, over its
    own tiles.)"""
    resolved = _resolve(backend, x)
    if resolved == "triton":
        return _triton_quant.linear_blocks(x, values, scales, mins, bias)
    return reference.linear_blocks(x, values, scales, mins, bias)


def pack_nibbles(values):
    """int8 values 0..15 [N, K] -> linear_blocks' 4-bit layout, uint8 [N, K / 2] (for the
    Triton kernel: needs triton)."""
    if _triton_quant is None:
        raise ValueError("the 4-bit layout of linear_blocks needs the triton package")
    return _triton_quant.pack_nibbles(values)


__all__ = ["BACKENDS", "attention_plan", "cpu_fused", "cpu_linear", "linear_blocks",
           "pack_nibbles", "paged_attention", "reshape_and_cache", "reference", "rms_norm",
           "rotary", "silu_and_mul"]

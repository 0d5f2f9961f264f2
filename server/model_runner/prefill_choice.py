"""Up to which sequence length the compiled CPU attention kernel takes a prompt's rows (each row
a decode over its own causal prefix) instead of SDPA, measured on this machine at lengths 128,
256, ... up to the longest a step can reach, and cached on disk like the compiled step's rows.

Row by row reads K and V once per query row; SDPA's blocked loops reuse them across rows but
cost a call (and a K/V gather) per prompt per layer. On a Zen 4 the kernel took 0.67-0.83x
SDPA's time up to 512 tokens and 1.1-1.4x from 768 (docs/cpu-kernels.md, "Prefill attention"),
so the crossover is measured, not assumed.
"""

from __future__ import annotations

import logging

import torch

from pagedserve_kernels import native, ops
from server.model_runner import step_choice

logger = logging.getLogger(__name__)

FIRST_LEN = 128
LAST_LEN = 4096  # longer sequences keep SDPA unmeasured: a 32k-token prompt's call takes seconds


def lengths(max_len: int) -> list[int]:
    """128, 256, ... while below max_len (at most LAST_LEN), then that bound itself."""
    max_len = min(max_len, LAST_LEN)
    out, n = [], FIRST_LEN
    while n < max_len:
        out.append(n)
        n *= 2
    return [*out, max_len]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def prompt_batch(seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype) -> Batch:
    """paged_attention's arguments for one whole prompt of seq_len tokens over its own cache
    blocks, random values."""
    gen = torch.Generator().manual_seed(0)
    num_blocks = -(-seq_len // block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(seq_len, num_heads, head_dim, generator=gen).to(dtype)
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    query_start_loc = torch.tensor([0, seq_len], dtype=torch.int32)
    return query, key_cache, value_cache, table, seq_lens, query_start_loc


def measure(seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
            dtype: torch.dtype, sliding_window: int | None) -> tuple[float, float]:
    """Seconds of one layer's attention of a seq_len-token prompt: (kernel, SDPA)."""
    args = prompt_batch(seq_len, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    table, seq_lens, starts = args[3:6]

    def run(limit: int | None):
        plan = ops.attention_plan(table, seq_lens, starts, block_size, sliding_window,
                                      backend="cpu", native_prefill_len=limit)
        return lambda: ops.paged_attention(*args, scale, sliding_window=sliding_window,
                                               backend="cpu", plan=plan)

    kernel, sdpa = run(None), run(0)
    kernel(), sdpa()  # warm-up
    return step_choice.timings(kernel, sdpa, ())


def measured_len(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, sliding_window: int | None, max_len: int) -> int:
    """The longest measured length up to which the kernel beat SDPA at every length (0: not
    even at the first), read from the kernel cache directory when measured before."""
    key = [native.build_key("paged_decode_cpu"), str(dtype), num_heads, num_kv_heads,
           head_dim, block_size, sliding_window]
    with torch.inference_mode():
        limit, seconds = step_choice.cached_bound(
            "prefill-attention.json", key, lengths(max_len), lambda n: measure(
                n, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window))
    if seconds is not None:
        logger.info("prompt attention measured in %.1f s: the compiled kernel up to %d "
                    "tokens, SDPA beyond", seconds, limit)
    return limit

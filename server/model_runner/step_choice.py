"""How many decode rows the compiled decode step takes, measured on this machine: the step
against the layer-by-layer forward at row buckets 1, 2, 4, ... COMPILED_DECODE_ROWS, over
the model's own weights and the runner's (still unused) KV cache, and cached on disk.

The step runs every projection on the own GEMM tiles and saves the ~20 torch ops a layer costs
from Python; the layers run each projection on the kind its measured table chose. A GEMM's
timing alone cannot weigh the two: on an Intel Xeon with AMX, MKL's 1-row GEMV measured 15-20%
faster than the own tiles, so a rule "the step only where the own GEMM wins" kept fp32 decode
layer by layer, at 36 ms a token where the step takes 22 (docs/performance.md). So the step
takes the row counts from 1 up to the last bucket of an unbroken run where it measured faster.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import torch

from pagedserve_kernels import native, ops
from server.models.attention_metadata import AttentionMetadata
from server.models.layers.gemm_choice import TableCache

logger = logging.getLogger(__name__)

CONTEXT = 32  # tokens each measured row attends over (the same blocks for every row)
PASSES = 3  # interleaved passes per bucket; each path keeps its fastest


def choose_rows(bounds: Sequence[int], measure: Callable[[int], tuple[float, float]]) -> int:
    """The last bound of the run from the first where the step (measure(rows)[0], seconds) beats
    the layers ([1]); 0 when it loses at the first. Stops measuring at the first loss."""
    rows = 0
    for bound in bounds:
        step_s, layers_s = measure(bound)
        if step_s >= layers_s:
            break
        rows = bound
    return rows


def decode_batch(rows: int, num_blocks: int, block_size: int, sliding_window: int | None,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`rows` decodes of one token each over the same first blocks of the cache, their K/V not
    written (slot -1): what a decode step computes, with nothing in the cache changed."""
    context = min(CONTEXT, num_blocks * block_size)
    width = -(-context // block_size)
    table = torch.arange(width, dtype=torch.int32).repeat(rows, 1)
    seq_lens = torch.full((rows,), context, dtype=torch.int32)
    query_start_loc = torch.arange(rows + 1, dtype=torch.int32)
    slots = torch.full((rows,), -1, dtype=torch.int64)
    plan = ops.attention_plan(table, seq_lens, query_start_loc, block_size, sliding_window,
                                  backend=backend)
    md = AttentionMetadata(query_start_loc, seq_lens, table, slots, backend, plan)
    return (torch.zeros(rows, dtype=torch.long), torch.full((rows,), context - 1), md)


def timings(step: Callable, layers: Callable, batch: tuple) -> tuple[float, float]:
    """Seconds of one call of each on `batch`: passes alternating, each path's fastest."""
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for _ in range(PASSES):
            for i, run in enumerate((step, layers)):
                start = time.perf_counter()
                run(*batch)
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def cached_bound(file_name: str, key: Sequence[object], bounds: Sequence[int],
                 measure: Callable[[int], tuple[float, float]]) -> tuple[int, float | None]:
    """choose_rows, read from `file_name` in the kernel cache directory when this key (with
    the CPU, torch version and thread count) was measured before; also the seconds the
    measurement took (None: read from the cache)."""
    full_key = json.dumps([native.cpu_signature(), torch.__version__, torch.get_num_threads(),
                           *key, list(bounds)])
    cache = TableCache(native.cache_dir() / file_name)
    cached = cache.value(full_key)
    if isinstance(cached, int) and (cached == 0 or cached in bounds):
        return cached, None
    start = time.perf_counter()
    bound = choose_rows(bounds, measure)
    cache.store(full_key, bound)
    return bound, time.perf_counter() - start


def measured_rows(key: Sequence[object], bounds: Sequence[int],
                  measure: Callable[[int], tuple[float, float]]) -> int:
    """choose_rows for the compiled decode step, cached per key."""
    rows, seconds = cached_bound(
        "compiled-step.json", [native.build_key("decoder_cpu"), native.build_key("gemm_cpu"),
                               CONTEXT, *key], bounds, measure)
    if seconds is not None:
        logger.info("compiled decode step measured against the layers in %.1f s: faster at "
                    "1-%d rows", seconds, rows)
    return rows

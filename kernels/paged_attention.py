"""Unified paged attention (Triton): one launch for a flattened batch that mixes decodes, whole
prompts and prefill chunks on top of a cached prefix, reading K/V through each sequence's block
table; plus a split-KV (flash-decoding) variant with a reduce step for decode batches with few
sequences and long contexts.

Query token j of sequence i sits at position seq_lens[i] - q_len_i + j and attends causally to
every cached position up to it (and, with a sliding window W, only to the last W of them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MIN_BLOCK_M = 16  # tl.dot needs >= 16 rows
DEFAULT_NUM_SPLITS = 16


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with query_start_loc[i] // BLOCK_Q + i <= q_block_global (binary search)."""
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        val = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if val <= q_block_global:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _attend_tiles(
    q,
    key_cache_ptr, value_cache_ptr, block_table_ptr,
    seq_idx, kv_head, query_abs_pos, row_mask, seq_len, tile_start, tile_end, scale,
    stride_bt_s, stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, SLIDING_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax over cache blocks [tile_start, tile_end) of one sequence; returns the
    unnormalised output, the running max and the running sum of exponentials per row."""
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, DIM_PAD)
    dim_mask = offs_d < HEAD_DIM
    for tile in range(tile_start, tile_end):
        physical = tl.load(block_table_ptr + seq_idx * stride_bt_s + tile).to(tl.int64)
        key_pos = tile * BLOCK_SIZE + offs_t
        base = (physical * stride_cache_b + offs_t.to(tl.int64) * stride_cache_s
                + kv_head * stride_cache_h)
        # K^T tile [DIM_PAD, BLOCK_SIZE] and V tile [BLOCK_SIZE, DIM_PAD].
        k = tl.load(key_cache_ptr + base[None, :] + offs_d[:, None] * stride_cache_d,
                    mask=dim_mask[:, None] & (key_pos < seq_len)[None, :], other=0.0)
        v = tl.load(value_cache_ptr + base[:, None] + offs_d[None, :] * stride_cache_d,
                    mask=(key_pos < seq_len)[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision="ieee") * scale  # fp32 stays fp32, not TF32
        mask = (row_mask[:, None] & (key_pos[None, :] <= query_abs_pos[:, None])
                & (key_pos < seq_len)[None, :])
        if SLIDING_WINDOW > 0:
            mask = mask & (key_pos[None, :] > query_abs_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_queries(query_ptr, token_idx, head_idx, row_mask, stride_q_t, stride_q_h, stride_q_d,
                  HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, UPCAST: tl.constexpr):
    offs_d = tl.arange(0, DIM_PAD)
    q = tl.load(query_ptr + token_idx.to(tl.int64)[:, None] * stride_q_t
                + head_idx[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _first_tile(query_abs_pos_min, SLIDING_WINDOW: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    if SLIDING_WINDOW > 0:
        return tl.maximum(query_abs_pos_min - SLIDING_WINDOW + 1, 0) // BLOCK_SIZE
    return 0


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    num_seqs, scale,
    stride_q_t, stride_q_h, stride_q_d,
    stride_o_t, stride_o_h, stride_o_d,
    stride_bt_s,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_idx = _find_seq_idx(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    q_block_local = q_block_global - (q_start // BLOCK_Q + seq_idx)
    if q_block_local * BLOCK_Q >= q_len:
        return
    offs_m = tl.arange(0, BLOCK_M)
    query_local = q_block_local * BLOCK_Q + offs_m // GROUP
    head_idx = kv_head * GROUP + offs_m % GROUP
    row_mask = (query_local < q_len) & (offs_m < BLOCK_Q * GROUP)
    token_idx = q_start + query_local
    q = _load_queries(query_ptr, token_idx, head_idx, row_mask, stride_q_t, stride_q_h,
                      stride_q_d, HEAD_DIM, DIM_PAD, UPCAST)

    seq_len = tl.load(seq_lens_ptr + seq_idx)
    context_len = seq_len - q_len
    query_abs_pos = context_len + query_local
    last_pos = context_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len) - 1
    tile_end = last_pos // BLOCK_SIZE + 1
    tile_start = _first_tile(context_len + q_block_local * BLOCK_Q, SLIDING_WINDOW, BLOCK_SIZE)

    acc, m_i, l_i = _attend_tiles(
        q, key_cache_ptr, value_cache_ptr, block_table_ptr,
        seq_idx, kv_head, query_abs_pos, row_mask, seq_len, tile_start, tile_end, scale,
        stride_bt_s, stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
        HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_M, SLIDING_WINDOW, UPCAST)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_d = tl.arange(0, DIM_PAD)
    tl.store(out_ptr + token_idx.to(tl.int64)[:, None] * stride_o_t
             + head_idx[:, None] * stride_o_h + offs_d[None, :] * stride_o_d,
             acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def paged_attention_split_kernel(
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, DIM_PAD] fp32
    partial_max_ptr,  # [num_seqs, num_heads, NUM_SPLITS] fp32
    partial_sum_ptr,  # [num_seqs, num_heads, NUM_SPLITS] fp32
    query_ptr,  # [num_seqs, num_heads, head_dim]: decode only, one query token per sequence
    key_cache_ptr, value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    scale,
    stride_q_t, stride_q_h, stride_q_d,
    stride_bt_s,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    head_idx = kv_head * GROUP + offs_m
    row_mask = offs_m < GROUP
    token_idx = tl.full([BLOCK_M], 0, tl.int32) + seq_idx
    q = _load_queries(query_ptr, token_idx, head_idx, row_mask, stride_q_t, stride_q_h,
                      stride_q_d, HEAD_DIM, DIM_PAD, UPCAST)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    query_abs_pos = tl.full([BLOCK_M], 0, tl.int32) + seq_len - 1
    num_tiles = tl.cdiv(seq_len, BLOCK_SIZE)
    first = _first_tile(seq_len - 1, SLIDING_WINDOW, BLOCK_SIZE)
    per_split = tl.cdiv(num_tiles - first, NUM_SPLITS)
    tile_start = first + split * per_split
    tile_end = tl.minimum(tile_start + per_split, num_tiles)

    acc, m_i, l_i = _attend_tiles(
        q, key_cache_ptr, value_cache_ptr, block_table_ptr,
        seq_idx, kv_head, query_abs_pos, row_mask, seq_len, tile_start, tile_end, scale,
        stride_bt_s, stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
        HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_M, SLIDING_WINDOW, UPCAST)
    row = (seq_idx.to(tl.int64) * NUM_HEADS + head_idx) * NUM_SPLITS + split
    offs_d = tl.arange(0, DIM_PAD)
    tl.store(partial_out_ptr + row[:, None] * DIM_PAD + offs_d[None, :], acc,
             mask=row_mask[:, None])
    tl.store(partial_max_ptr + row, m_i, mask=row_mask)
    tl.store(partial_sum_ptr + row, l_i, mask=row_mask)


@triton.jit
def reduce_splits_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    stride_o_t, stride_o_h, stride_o_d,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq_idx = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row0 = (seq_idx * NUM_HEADS + head) * NUM_SPLITS
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, DIM_PAD)
    m = tl.load(partial_max_ptr + row0 + offs_s)
    l_s = tl.load(partial_sum_ptr + row0 + offs_s)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    total = tl.sum(l_s * weight, axis=0)
    parts = tl.load(partial_out_ptr + (row0 + offs_s)[:, None] * DIM_PAD + offs_d[None, :])
    acc = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq_idx * stride_o_t + head * stride_o_h + offs_d * stride_o_d,
             acc.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_args(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
               out) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got "
                         f"{tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must be [num_blocks, block_size, "
                         f"num_kv_heads, head_dim] and equal; got {tuple(key_cache.shape)} "
                         f"and {tuple(value_cache.shape)}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must share strides")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim differs: query {head_dim}, cache {key_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be a 2-D int32 tensor, got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    num_seqs = block_table.shape[0]
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [num_seqs={num_seqs}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc must be int32 [num_seqs + 1={num_seqs + 1}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"query dtype must be float32, float16 or bfloat16, got {query.dtype}")
    if key_cache.dtype != query.dtype:
        raise ValueError(f"cache dtype {key_cache.dtype} differs from query dtype {query.dtype}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(f"out must match query ({tuple(query.shape)}, {query.dtype})")
    tensors = [query, key_cache, value_cache, block_table, seq_lens, query_start_loc]
    devices = {t.device for t in tensors + ([out] if out is not None else [])}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def choose_num_splits(num_tokens: int, num_seqs: int, num_kv_heads: int, max_blocks: int,
                      block_size: int) -> int:
    """Split-KV for decode-only batches whose (sequence, kv head) pairs cannot fill the GPU
    and whose block tables allow long contexts. Uses shapes only (no device reads)."""
    if num_tokens != num_seqs or num_seqs * num_kv_heads >= 128:
        return 1
    if max_blocks * block_size < 2048:
        return 1
    return DEFAULT_NUM_SPLITS


def kernel_constexprs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                      sliding_window: int | None, upcast: bool,
                      num_splits: int = 1) -> dict[str, int | bool]:
    """The compile-time parameters the wrapper passes for these shapes (also what the
    ahead-of-time compile test builds): the single-pass kernel's when num_splits == 1, else the
    split kernel's."""
    group = num_heads // num_kv_heads
    common = dict(GROUP=group, HEAD_DIM=head_dim,
                  DIM_PAD=max(triton.next_power_of_2(head_dim), 16), BLOCK_SIZE=block_size,
                  SLIDING_WINDOW=int(sliding_window or 0), UPCAST=upcast)
    if num_splits > 1:
        return dict(NUM_HEADS=num_heads, **common,
                    BLOCK_M=max(triton.next_power_of_2(group), MIN_BLOCK_M),
                    NUM_SPLITS=triton.next_power_of_2(num_splits))
    block_m = max(MIN_BLOCK_M, triton.next_power_of_2(group))
    return dict(**common, BLOCK_Q=block_m // group, BLOCK_M=block_m)


def reduce_constexprs(num_heads: int, head_dim: int, num_splits: int) -> dict[str, int]:
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                DIM_PAD=max(triton.next_power_of_2(head_dim), 16),
                NUM_SPLITS=triton.next_power_of_2(num_splits))


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                    scale: float, out=None, sliding_window: int | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """`num_splits`: None picks automatically; 1 forces the single-pass kernel; > 1 forces
    split-KV (decode-only batches)."""
    check_args(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, out)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs, max_blocks = block_table.shape
    if block_size < 16:
        raise ValueError(f"the Triton kernel needs block_size >= 16, got {block_size}")
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    upcast = _interpreting() and query.dtype != torch.float32
    if num_splits is None:
        num_splits = choose_num_splits(num_tokens, num_seqs, num_kv_heads, max_blocks,
                                       block_size)
    meta = kernel_constexprs(num_heads, num_kv_heads, head_dim, block_size, sliding_window,
                             upcast, num_splits)
    if num_splits > 1:
        if num_tokens != num_seqs:
            raise ValueError("split-KV needs a decode-only batch (one query token per sequence)")
        splits, dim_pad = meta["NUM_SPLITS"], meta["DIM_PAD"]
        partial_out = torch.empty((num_seqs, num_heads, splits, dim_pad),
                                  dtype=torch.float32, device=query.device)
        partial_max = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32,
                                  device=query.device)
        partial_sum = torch.empty_like(partial_max)
        paged_attention_split_kernel[(num_seqs, num_kv_heads, splits)](
            partial_out, partial_max, partial_sum, query, key_cache, value_cache, block_table,
            seq_lens, scale, *query.stride(), block_table.stride(0), *key_cache.stride(),
            **meta)
        reduce_splits_kernel[(num_seqs, num_heads)](
            out, partial_out, partial_max, partial_sum, *out.stride(),
            **reduce_constexprs(num_heads, head_dim, splits))
        return out
    grid = (num_tokens // meta["BLOCK_Q"] + num_seqs, num_kv_heads)
    paged_attention_kernel[grid](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        num_seqs, scale, *query.stride(), *out.stride(), block_table.stride(0),
        *key_cache.stride(), **meta)
    return out

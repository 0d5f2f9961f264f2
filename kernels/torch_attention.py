"""A faster torch path for paged attention off CUDA: decodes batched into one padded attention
call, prompts and prefill chunks through SDPA per sequence. Same signature and semantics as
kernels.reference.

Blocks are gathered with `index_select` over a [num_blocks, block_bytes] view (a row copy per
block, ~9x faster than advanced indexing on CPU), and GQA is an `expand` of the kv heads over
their query group (no copy; SDPA's enable_gqa falls back to the slow math path on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """kernels.reference.reshape_and_cache with index_copy_ over flattened slots."""
    slots = slot_mapping.long()
    if slots.numel() and int(slots.min()) < 0:
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    num_slots, row = num_blocks * block_size, num_kv_heads * head_dim
    key_cache.view(num_slots, row).index_copy_(0, slots, key.reshape(len(slots), row)
                                               .to(key_cache.dtype))
    value_cache.view(num_slots, row).index_copy_(0, slots, value.reshape(len(slots), row)
                                                 .to(value_cache.dtype))


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The cache rows of `blocks` (1-D), as [len(blocks) * block_size, num_kv_heads, head_dim]."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    if not cache.is_contiguous():  # e.g. K and V as views of one buffer
        return cache[blocks].view(-1, num_kv_heads, head_dim)
    rows = cache.view(num_blocks, -1).index_select(0, blocks)
    return rows.view(-1, num_kv_heads, head_dim)


def _one_sequence(query, key_cache, value_cache, table, seq_len, q_start, q_len, scale,
                  sliding_window, out) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    blocks = table[:-(-seq_len // key_cache.shape[1])].long()
    shape = (num_kv_heads, group, seq_len, head_dim)
    # [kv_heads, group, seq_len, head_dim], the group dimension an expand of stride 0
    k = _gather(key_cache, blocks)[:seq_len].permute(1, 0, 2).float()[:, None].expand(shape)
    v = _gather(value_cache, blocks)[:seq_len].permute(1, 0, 2).float()[:, None].expand(shape)
    q = query[q_start:q_start + q_len].view(q_len, num_kv_heads, group, head_dim)
    q = q.permute(1, 2, 0, 3).float()  # [kv_heads, group, q_len, head_dim]
    if sliding_window is None and q_len == seq_len:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    out[q_start:q_start + q_len] = o.permute(2, 0, 1, 3).reshape(q_len, -1, head_dim)


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                    scale: float, out=None, sliding_window=None) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if query.shape[0] == num_seqs:  # decode-only: one batched call
        _decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale,
                          sliding_window, out)
        return out
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
    if len(decodes) > 1:
        rows = torch.tensor(decodes, device=query.device)
        token_rows = query_start_loc[rows].long()
        part = torch.empty((len(decodes),) + tuple(query.shape[1:]), dtype=out.dtype,
                           device=out.device)
        _decode_attention(query[token_rows], key_cache, value_cache, block_table[rows],
                          seq_lens[rows], scale, sliding_window, part)
        out[token_rows] = part
    else:
        decodes = []
    done = set(decodes)
    for i, seq_len in enumerate(lens):
        q_len = starts[i + 1] - starts[i]
        if i in done or q_len == 0:
            continue
        _one_sequence(query, key_cache, value_cache, block_table[i], seq_len, starts[i],
                      q_len, scale, sliding_window, out)
    return out


def _decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale,
                      sliding_window, out) -> None:
    """Row i of query/out is the one query token of sequence i. The G query heads sharing a
    kv head act as G query rows of one attention call over that head's keys."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    block_size = key_cache.shape[1]
    batch = query.shape[0]
    lens = seq_lens.long()
    max_len = int(lens.max())
    num_blocks = -(-max_len // block_size)
    blocks = block_table[:, :num_blocks].long().reshape(-1)
    shape = (batch, num_blocks * block_size, num_kv_heads, head_dim)
    k = _gather(key_cache, blocks).view(shape).transpose(1, 2)
    v = _gather(value_cache, blocks).view(shape).transpose(1, 2)
    pos = torch.arange(num_blocks * block_size, device=query.device)
    allowed = pos[None, :] < lens[:, None]
    if sliding_window is not None:
        allowed &= pos[None, :] > (lens[:, None] - 1 - sliding_window)
    q = query.view(batch, num_kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                       attn_mask=allowed[:, None, None, :], scale=scale)
    out.copy_(o.reshape(out.shape))

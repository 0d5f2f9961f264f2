"""A faster torch path for paged attention off CUDA: decodes batched into one padded attention
call, prompts and prefill chunks through SDPA per sequence (no repeat_interleave: GQA is a
reshape). Same signature and semantics as kernels.reference.paged_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _one_sequence(query, key_cache, value_cache, table, seq_len, q_start, q_len, scale,
                  sliding_window, out) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    block_size = key_cache.shape[1]
    blocks = table[:-(-seq_len // block_size)].long()
    k = key_cache[blocks].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1).float()
    v = value_cache[blocks].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1).float()
    q = query[q_start:q_start + q_len].transpose(0, 1).float()  # [H, q_len, D]
    if sliding_window is None and q_len == seq_len:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                           enable_gqa=True)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                           enable_gqa=True)
    out[q_start:q_start + q_len] = o.transpose(0, 1).to(out.dtype)


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
    tables = block_table[:, :num_blocks].long()
    k = key_cache[tables].view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    v = value_cache[tables].view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    pos = torch.arange(num_blocks * block_size, device=query.device)
    allowed = pos[None, :] < lens[:, None]
    if sliding_window is not None:
        allowed &= pos[None, :] > (lens[:, None] - 1 - sliding_window)
    q = query.view(batch, num_kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(q.float(), k.transpose(1, 2).float(),
                                       v.transpose(1, 2).float(),
                                       attn_mask=allowed[:, None, None, :], scale=scale)
    out.copy_(o.reshape(out.shape))

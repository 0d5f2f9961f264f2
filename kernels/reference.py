"""Straightforward torch references for the kernels, with the kernels' signatures.

They define the contract the Triton kernels are tested against and serve as the CPU path.
"""

from __future__ import annotations

import torch


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens], block_id * block_size + offset; < 0: padding
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(value_cache.dtype)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context, in fp32."""
    num_heads = query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_table[i, :num_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, key_cache.shape[3])[:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, value_cache.shape[3])[:seq_len]
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def rms_norm(
    x: torch.Tensor,  # [rows, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [rows, hidden]; given: residual += x, in place
) -> torch.Tensor:
    """RMSNorm in fp32, scaled by the weight after casting back (as transformers does); with
    `residual`, the norm of `residual + x`, which is left in `residual`."""
    if residual is not None:
        residual.add_(x)
        x = residual
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [rows, 2n] -> [rows, n]
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary(
    x: torch.Tensor,  # [num_tokens, heads, head_dim]; any heads: q and k may go in one call
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    sin: torch.Tensor,  # [num_tokens, 1, head_dim]
) -> torch.Tensor:
    """Half-split rotary embedding (a new tensor; the kernels may rotate x in place). Two
    products and a sum, each rounded to x's dtype, as transformers computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [byte, bit]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[r, t] = -inf where bit t % 32 of bitmask[r, t // 32] is 0, for r in
    `rows` (int32 words, little-endian bit order, as xgrammar writes them)."""
    if not rows:
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    words = bitmask.to(logits.device).index_select(0, index).contiguous()
    table = _BYTE_BITS.to(logits.device)
    keep = table[words.view(torch.uint8).long()].view(len(rows), -1)[:, :logits.shape[1]]
    logits[index] = logits.index_select(0, index).masked_fill(~keep, float("-inf"))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's first maximum (a row's first NaN where it has one), int64."""
    return logits.max(dim=-1).indices


def quantize_rows_q8(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [rows, in] fp32 -> (int8 values [rows, in], scales [rows, in / block]) as the
    8-bit GEMM quantizes them: d = max|x| / 127, q = round(x * (1 / d)) to nearest even."""
    xb = x.to(torch.float32).reshape(x.shape[0], -1, block)
    d = xb.abs().amax(dim=-1) / 127.0
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = (xb * inv.unsqueeze(-1)).round().clamp(-127, 127)
    return q.reshape(x.shape).to(torch.int8), d


def linear_q8_0(x: torch.Tensor, scales: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                block: int = 32) -> torch.Tensor:
    """F.linear of fp32 x [rows, in] with 8-bit weights d * q + m: values [out, in] int8 with
    scales and offsets [out, in / block] (fp16; no offsets: 0), in the 8-bit GEMM's
    arithmetic: activations quantized per block, each block's dot product exact, then times
    both scales, plus the offset times the block's quantized activation sum, over blocks in
    fp32."""
    xq, xd = quantize_rows_q8(x, block)
    rows, out_features = x.shape[0], values.shape[0]
    xi = xq.to(torch.float64).reshape(rows, -1, block).transpose(0, 1)  # [blocks, rows, block]
    wi = values.to(torch.float64).reshape(out_features, -1, block).permute(1, 2, 0)
    dots = torch.bmm(xi, wi).to(torch.float32)  # exact: |sum| < 2^24 · [blocks, rows, out]
    weights = scales.to(torch.float32).t().unsqueeze(1) * xd.t().unsqueeze(2)
    xsum = xd * xq.to(torch.float32).reshape(rows, -1, block).sum(-1)  # [rows, blocks]
    out = torch.zeros(rows, out_features, dtype=torch.float32)
    for b in range(dots.shape[0]):
        out += dots[b] * weights[b]
        if mins is not None:
            out += xsum[:, b:b + 1] * mins[:, b].to(torch.float32)
    return out if bias is None else out + bias


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] in the 4-bit layout (per block of 32 values, byte j holds value j in its
    low nibble and value j + 16 in its high nibble) -> uint8 values 0..15 [N, K]."""
    blocks = packed.reshape(packed.shape[0], -1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(packed.shape[0], -1)


def linear_blocks(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) in fp32, cast to x's dtype, with w[n, k] = scales[n, k // 32] *
    q[n, k] (+ mins[n, k // 32]); q = values (int8 [N, K]) or their nibbles (uint8 [N, K // 2])."""
    q = unpack_nibbles(values) if values.dtype == torch.uint8 else values
    num_out, num_in = q.shape
    w = q.to(torch.float32).reshape(num_out, -1, 32) * scales.to(torch.float32).unsqueeze(-1)
    if mins is not None:
        w = w + mins.to(torch.float32).unsqueeze(-1)
    out = torch.nn.functional.linear(x.to(torch.float32), w.reshape(num_out, num_in),
                                     None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)

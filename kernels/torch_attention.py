"""A faster torch path for paged attention off CUDA: decodes batched into one padded attention
call, prompts and prefill chunks through SDPA per sequence. Same signature and semantics as
kernels.reference, plus an optional `AttentionPlan`.

Blocks are gathered with `index_select` over a [num_blocks, block_bytes] view (a row copy per
block, ~9x faster than advanced indexing on CPU), and GQA is an `expand` of the kv heads over
their query group (no copy; SDPA's enable_gqa falls back to the slow math path on CPU).

Everything that depends only on the batch's shape (block ids, masks, which rows decode) is an
`AttentionPlan`, built once per step by `build_plan` and shared by every layer's call. A plan
built with `native=True` (backend "cpu") sends every row, fp32 or bf16, to the compiled kernel
of kernels/cpu_attention.py instead, which reads the blocks in place: no gather at all. A
prompt row there is a decode over its own causal prefix (its sequence's first p + 1 tokens at
position p), so a step with prompts makes one kernel call per layer, not an SDPA call per
prompt. Row by row reads K and V once per query row, so past some length SDPA's blocked loops
win: sequences longer than the plan's `native_prefill_len` keep SDPA (docs/cpu-kernels.md,
"Prefill attention").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedserve_kernels import cpu_attention


@dataclass(slots=True)
class _Prefill:
    q_start: int
    q_len: int
    seq_len: int
    blocks: torch.Tensor  # [num_blocks] int64
    mask: torch.Tensor | None  # [q_len, seq_len] bool; None: plain causal (q_len == seq_len)


@dataclass(slots=True)
class _DecodeGather:
    blocks: torch.Tensor  # [num_decodes * width] int64
    width: int  # blocks gathered per decode (the longest decode's)
    mask: torch.Tensor  # [num_decodes, 1, 1, width * block_size] bool
    # The gathered rows the mask excludes (num_decodes * width * block_size row space): zeroed
    # after the gather, because a masked score still carries a NaN or inf in K, and a zero
    # weight times a NaN in V is NaN. Slots past a sequence's length hold anything.
    masked_rows: torch.Tensor  # [n] int64


@dataclass(slots=True)
class _NativeRows:
    """The compiled kernel's view of a step with prompt rows: every query row a decode of its
    own, attending to the first seq_lens[i] tokens of its sequence's block table row."""
    rows: torch.Tensor  # [n] int64 query rows
    seqs: torch.Tensor  # [n] int64: row i's entry in block_table and seq_lens, i.e. i
    block_table: torch.Tensor  # [n, max_blocks] int32: the row's sequence's table row
    seq_lens: torch.Tensor  # [n] int32: its position + 1


@dataclass(slots=True)
class AttentionPlan:
    block_size: int
    sliding_window: int | None
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    all_decode: bool  # every sequence has exactly one query token: rows are sequences
    decode_rows: torch.Tensor | None  # [num_decodes] int64 query rows of the batched decodes
    decode_seqs: torch.Tensor | None  # [num_decodes] int64 their sequences
    native: bool  # every row through kernels.cpu_attention where it supports the tensors
    prefills: list[_Prefill]
    query_start_loc: torch.Tensor | None = None
    # Native prompt rows only of sequences of up to this many tokens (None: all of them).
    native_prefill_len: int | None = None
    gather: _DecodeGather | None = None  # built on first use: the native kernel needs none
    rows: _NativeRows | None = None  # built on first use, where there are prompt rows
    native_checked: tuple | None = None  # (num_blocks, num_tokens) the native inputs fit
    # Gather destinations reused by every layer of the step (each layer's attention has
    # consumed them before the next layer gathers): no fresh multi-MB buffers per layer.
    buffers: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, rows, like.shape[1:].numel(), like.dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = like.new_empty((rows, like.shape[1:].numel()))
        return buf

    def sdpa_prefill(self, p: _Prefill) -> bool:
        """Whether the native path leaves this prompt chunk to SDPA."""
        return self.native_prefill_len is not None and p.seq_len > self.native_prefill_len

    def native_rows(self) -> _NativeRows:
        """The decodes and the prompt rows the kernel takes as one batch of decodes."""
        if self.rows is None:
            if not any(not self.sdpa_prefill(p) for p in self.prefills):
                none = torch.zeros(0, dtype=torch.int64, device=self.seq_lens.device)
                self.rows = _NativeRows(
                    none if self.decode_rows is None else self.decode_rows,
                    none if self.decode_seqs is None else self.decode_seqs, self.block_table,
                    self.seq_lens)
            else:
                assert self.query_start_loc is not None
                starts = self.query_start_loc.long()
                q_lens = starts[1:] - starts[:-1]
                seq_of_row = torch.repeat_interleave(
                    torch.arange(len(q_lens), device=starts.device), q_lens)
                rows = torch.arange(int(starts[0]), int(starts[-1]), device=starts.device)
                if self.native_prefill_len is not None:
                    keep = (q_lens == 1) | (self.seq_lens.long() <= self.native_prefill_len)
                    rows, seq_of_row = rows[keep[seq_of_row]], seq_of_row[keep[seq_of_row]]
                before = (self.seq_lens.long() - q_lens)[seq_of_row]
                lens = before + (rows - starts[seq_of_row]) + 1
                self.rows = _NativeRows(rows, torch.arange(len(rows), device=rows.device),
                                        self.block_table[seq_of_row], lens.to(torch.int32))
        return self.rows

    def decode_gather(self) -> _DecodeGather:
        """Block ids and mask of the batched decodes' padded gather."""
        if self.gather is None:
            assert self.decode_seqs is not None
            dec_lens = self.seq_lens[self.decode_seqs].long()
            width = -(-int(dec_lens.max()) // self.block_size)
            table = self.block_table if self.all_decode else self.block_table[self.decode_seqs]
            pos = torch.arange(width * self.block_size, device=dec_lens.device)
            allowed = pos[None, :] < dec_lens[:, None]
            if self.sliding_window is not None:
                allowed &= pos[None, :] > (dec_lens[:, None] - 1 - self.sliding_window)
            self.gather = _DecodeGather(table[:, :width].long().reshape(-1), width,
                                        allowed[:, None, None, :],
                                        (~allowed).reshape(-1).nonzero().squeeze(1))
        return self.gather


def build_plan(block_table, seq_lens, query_start_loc, block_size: int,
               sliding_window: int | None, native: bool = False,
               native_prefill_len: int | None = None) -> AttentionPlan:
    """The per-step part of paged_attention: what every layer's call would recompute.
    `native`: run the rows through the compiled CPU kernel when the tensors allow, the prompt
    rows of sequences of up to `native_prefill_len` tokens (None: all)."""
    num_seqs = seq_lens.shape[0]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]
    all_decode = starts[-1] == num_seqs and all(n == 1 for n in q_lens)
    decodes = [i for i in range(num_seqs) if q_lens[i] == 1]
    if not all_decode and len(decodes) < (1 if native else 2):
        decodes = []
    device = block_table.device
    decode_rows = decode_seqs = None
    if decodes:
        decode_seqs = torch.tensor(decodes, device=device)
        decode_rows = torch.tensor([starts[i] for i in decodes], device=device)
    done = set(decodes)
    prefills = []
    for i, seq_len in enumerate(lens):
        q_len = q_lens[i]
        if i in done or q_len == 0:
            continue
        blocks = block_table[i, :-(-seq_len // block_size)].long()
        mask = None
        if sliding_window is not None or q_len != seq_len:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
            k_pos = torch.arange(seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        prefills.append(_Prefill(starts[i], q_len, seq_len, blocks, mask))
    return AttentionPlan(block_size, sliding_window, block_table, seq_lens, all_decode,
                         decode_rows, decode_seqs, native, prefills, query_start_loc,
                         native_prefill_len)


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


def _gather(cache: torch.Tensor, blocks: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The cache rows of `blocks` (1-D), as [len(blocks) * block_size, num_kv_heads, head_dim];
    `out`: a [len(blocks), block_size * num_kv_heads * head_dim] destination."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    if not cache.is_contiguous():  # e.g. K and V as views of one buffer
        return cache[blocks].view(-1, num_kv_heads, head_dim)
    rows = torch.index_select(cache.view(num_blocks, -1), 0, blocks, out=out)
    return rows.view(-1, num_kv_heads, head_dim)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                    scale: float, out=None, sliding_window=None,
                    plan: AttentionPlan | None = None) -> torch.Tensor:
    block_size = key_cache.shape[1]
    if plan is None or plan.block_size != block_size or plan.sliding_window != sliding_window:
        native = plan.native if plan is not None else False
        limit = plan.native_prefill_len if plan is not None else None
        plan = build_plan(block_table, seq_lens, query_start_loc, block_size, sliding_window,
                          native, limit)
    if plan.native and (plan.decode_rows is not None or plan.prefills) \
            and cpu_attention.supports(query, key_cache, value_cache, out):
        if out is None:
            out = torch.empty_like(query)
        rows = plan.native_rows()
        if plan.native_checked != (key_cache.shape[0], query.shape[0]):
            _check_native_inputs(rows, block_size, key_cache.shape[0], query.shape[0])
            plan.native_checked = (key_cache.shape[0], query.shape[0])
        if rows.rows.numel():
            cpu_attention.paged_decode(query, key_cache, value_cache, rows.block_table,
                                       rows.seq_lens, rows.rows, rows.seqs, scale, out,
                                       sliding_window)
        for prefill in plan.prefills:
            if plan.sdpa_prefill(prefill):
                _one_sequence(query, key_cache, value_cache, prefill, scale, out)
        return out
    if plan.decode_rows is not None:
        if plan.all_decode:
            o = _decode_attention(query, key_cache, value_cache, plan, scale)
            if out is None:
                return o.to(query.dtype)
            out.copy_(o)
            return out
        if out is None:
            out = torch.empty_like(query)
        out[plan.decode_rows] = _decode_attention(query[plan.decode_rows], key_cache,
                                                  value_cache, plan, scale).to(out.dtype)
    if out is None:
        out = torch.empty_like(query)
    for prefill in plan.prefills:
        _one_sequence(query, key_cache, value_cache, prefill, scale, out)
    return out


def _check_native_inputs(rows: _NativeRows, block_size: int, num_blocks: int,
                         num_tokens: int) -> None:
    """The compiled kernel indexes raw memory: once per plan (and cache), everything it will
    follow must be in range, so a bad batch raises here instead of reading out of bounds."""
    table = rows.block_table
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise ValueError(f"block_table holds ids outside [0, {num_blocks})")
    if rows.rows.numel() == 0:
        return
    if int(rows.seq_lens.max()) > table.shape[1] * block_size:
        raise ValueError("a sequence is longer than its block_table row covers")
    if int(rows.rows.max()) >= num_tokens:
        raise ValueError("a decode row lies past the query's tokens")


def _one_sequence(query, key_cache, value_cache, p: _Prefill, scale, out) -> None:
    """One prompt chunk's attention over its gathered K/V, in the query's dtype where the cache
    has it too (SDPA sums in fp32 either way; bf16 there took less than half the time of fp32
    copies, docs/cpu-kernels.md), else in fp32. The query heads of a kv head share it
    (enable_gqa), nothing is repeated."""
    head_dim = key_cache.shape[3]
    k = _gather(key_cache, p.blocks)[:p.seq_len].permute(1, 0, 2)[None]  # [1, kv, seq, dim]
    v = _gather(value_cache, p.blocks)[:p.seq_len].permute(1, 0, 2)[None]
    q = query[p.q_start:p.q_start + p.q_len].permute(1, 0, 2)[None]  # [1, heads, q_len, dim]
    if not q.dtype == k.dtype == v.dtype:
        q, k, v = _f32(q), _f32(k), _f32(v)
    if p.mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, scale=scale,
                                           enable_gqa=True)
    out[p.q_start:p.q_start + p.q_len] = o[0].permute(1, 0, 2).reshape(p.q_len, -1, head_dim)


def _decode_attention(query, key_cache, value_cache, plan: AttentionPlan,
                      scale) -> torch.Tensor:
    """Row i of query is the one query token of decode i; returns [rows, heads, head_dim] fp32.
    The G query heads sharing a kv head act as G query rows of one attention call over that
    head's keys."""
    gather = plan.decode_gather()
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    batch = query.shape[0]
    shape = (batch, gather.width * plan.block_size, num_kv_heads, head_dim)
    rows = len(gather.blocks)
    k_out = plan.buffer("k", rows, key_cache) if key_cache.is_contiguous() else None
    v_out = plan.buffer("v", rows, value_cache) if value_cache.is_contiguous() else None
    k_rows = _gather(key_cache, gather.blocks, k_out)
    v_rows = _gather(value_cache, gather.blocks, v_out)
    if gather.masked_rows.numel():
        k_rows.index_fill_(0, gather.masked_rows, 0.0)
        v_rows.index_fill_(0, gather.masked_rows, 0.0)
    k = k_rows.view(shape).transpose(1, 2)
    v = v_rows.view(shape).transpose(1, 2)
    q = query.reshape(batch, num_kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(_f32(q), _f32(k), _f32(v), attn_mask=gather.mask,
                                       scale=scale)
    return o.reshape(batch, -1, head_dim)

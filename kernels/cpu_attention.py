"""Decode attention on CPU through the compiled kernel kernels/csrc/paged_decode_cpu.cpp: each
decode's query token attends over its sequence's cache blocks, read in place through the block
table. fp32 or bf16 (query, caches and output of one dtype; fp32 sums); `supports` says when it
applies, the torch path covers everything else.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import F32, I32, I64, PTR

_NAME = "paged_decode_cpu"
_SUFFIXES = native.SUFFIXES
DTYPES = tuple(_SUFFIXES)
_SIGNATURES = {f"pagedserve_paged_decode_{suffix}": (
    [PTR, I64, PTR, I64,  # query, stride, out, stride
     PTR, PTR, I64, I64,  # key_cache, value_cache, stride_block, stride_slot
     PTR, I64, PTR,  # block_table, stride, seq_lens
     PTR, PTR, I64,  # rows, seqs, num_decodes
     I32, I32, I32, I32, F32, I32, I32],  # heads, kv heads, head_dim, block_size, scale,
    ctypes.c_int) for suffix in _SUFFIXES.values()}  # sliding_window, num_threads


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             out: torch.Tensor | None = None) -> bool:
    """fp32 or bf16 CPU tensors of one dtype with the head dim contiguous, K and V laid out
    alike."""
    head_dim, dtype = query.shape[2], query.dtype
    return (query.device.type == "cpu" and dtype in DTYPES
            and (out is None or (out.dtype == dtype and out.stride(2) == 1
                                 and out.stride(1) == head_dim))
            and key_cache.dtype == dtype and value_cache.dtype == dtype
            and key_cache.stride() == value_cache.stride()
            and key_cache.stride(3) == 1 and key_cache.stride(2) == key_cache.shape[3]
            and available())


def paged_decode(query: torch.Tensor,  # [num_tokens, num_heads, head_dim] fp32 or bf16
                 key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
                 value_cache: torch.Tensor,
                 block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
                 seq_lens: torch.Tensor,  # [num_seqs] int32
                 rows: torch.Tensor,  # [num_decodes] int64: the query row of each decode
                 seqs: torch.Tensor,  # [num_decodes] int64: its sequence
                 scale: float, out: torch.Tensor,  # like query; only the decode rows are written
                 sliding_window: int | None = None) -> torch.Tensor:
    """Attention of the decode rows (one query token each). Call `supports` first."""
    lib = _library()
    assert lib is not None, "call supports() first"
    fn = getattr(lib, f"pagedserve_paged_decode_{_SUFFIXES[query.dtype]}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    assert out.dtype == query.dtype == key_cache.dtype == value_cache.dtype
    assert out.stride(2) == 1 and out.stride(1) == head_dim
    assert out.shape == query.shape, (out.shape, query.shape)
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    rows, seqs = rows.to(torch.int64).contiguous(), seqs.to(torch.int64).contiguous()
    assert rows.shape == seqs.shape and rows.dim() == 1
    status = fn(query.data_ptr(), query.stride(0), out.data_ptr(), out.stride(0),
                key_cache.data_ptr(), value_cache.data_ptr(), key_cache.stride(0),
                key_cache.stride(1), block_table.data_ptr(), block_table.stride(0),
                seq_lens.data_ptr(), rows.data_ptr(), seqs.data_ptr(), rows.numel(), num_heads,
                num_kv_heads, head_dim, block_size, scale, sliding_window or 0,
                torch.get_num_threads())
    if status != 0:
        raise ValueError(f"paged_decode_cpu: unsupported heads ({num_heads} query heads, "
                         f"{num_kv_heads} kv heads)")
    return out

"""A whole decode step of a Llama-family decoder on CPU through kernels/csrc/decoder_cpu.cpp: all
layers (norms, GEMMs from kernels/cpu_linear.py's packed copies, q/k norm, rotary, the KV cache
write, decode attention, SiLU-and-mul) and the final norm in one call, for batches of a few
decodes, in fp32 or in bf16 (every tensor of a model in one dtype; fp32 sums).
`DecoderTensors` checks a model's tensors once and keeps the table of their addresses;
`decode_step` runs a step over it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from pagedserve_kernels import cpu_linear, cpu_quant, native
from pagedserve_kernels.native import F32, I32, I64, PTR

_NAME = "decoder_cpu"
_SUFFIXES = native.SUFFIXES
DTYPES = tuple(_SUFFIXES)
_SIGNATURES = {f"pagedserve_decode_step_{suffix}": (
    [PTR, PTR, PTR, PTR, PTR,  # embeddings, cos, sin, layer table, final norm
     PTR, PTR, I64, PTR, PTR,  # slots, block_table, its stride, seq_lens, out
     I64, I64, I64, I64, I64, I64, I64,  # rows, layers, hidden, heads, kv heads, head_dim, inter
     I64, I64, I64, I64,  # num_blocks, block_size, stride_block, stride_slot
     F32, F32, I32, I32],  # eps, scale, sliding_window, num_threads
    ctypes.c_int) for suffix in _SUFFIXES.values()}


@dataclass(frozen=True)
class LayerTensors:
    """One decoder layer as the compiled step reads it (the order is the C++ table's columns).
    qkv, o, gate_up, down: `kernels.cpu_linear.pack` copies of the fused projections."""
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    # bf16: qkv, o, gate_up, down run on AMX tiles from this many rows (cpu_linear.linear)
    amx_min_rows: tuple[int, int, int, int] = (1, 1, 1, 1)
    # fp32: which of qkv, o, gate_up, down are kernels/cpu_quant.py pack_blocks tiles (uint8,
    # 8- or 4-bit)
    q8: tuple[bool, bool, bool, bool] = (False, False, False, False)


PROJECTIONS = ("qkv", "o", "gate_up", "down")
TENSOR_COLUMNS = tuple(f.name for f in fields(LayerTensors)
                       if f.name not in ("amx_min_rows", "q8"))
LAYER_COLUMNS = (*TENSOR_COLUMNS, "qkv_amx", "o_amx", "gate_up_amx", "down_amx", "qkv_q8",
                 "o_q8", "gate_up_q8", "down_q8")


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


class DecoderTensors:
    """The tensors of every layer, checked once (dtype, device, contiguity, shapes), and the
    [num_layers, len(LAYER_COLUMNS)] table of their addresses and AMX row thresholds. Holds
    the tensors, so the addresses stay valid while it lives. The final norm's dtype is the
    step's."""

    def __init__(self, layers: Sequence[LayerTensors], final_norm: torch.Tensor, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> None:
        assert layers, "no layers"
        self.layers, self.final_norm = list(layers), final_norm
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = (num_heads, num_kv_heads,
                                                                      head_dim, eps)
        hidden = final_norm.shape[0]
        self.hidden, self.dtype = hidden, final_norm.dtype
        assert self.dtype in DTYPES, self.dtype
        dtype = self.dtype

        def packed(out_features: int, in_features: int) -> tuple[int, ...]:
            return cpu_linear.packed_shape(out_features, in_features, dtype)

        down = layers[0].down  # its inputs, in any of the layouts
        self.intermediate = (down.shape[1] * cpu_quant.BLOCK if layers[0].q8[3]
                             else down[0].numel() // 16)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.cache_shape = layers[0].key_cache.shape
        self.cache_stride = layers[0].key_cache.stride()
        assert (len(self.cache_shape) == 4 and self.cache_shape[2:] == (num_kv_heads, head_dim)
                and self.cache_stride[3] == 1 and self.cache_stride[2] == head_dim
                and self.cache_stride[1] == num_kv_heads * head_dim)
        shapes = {
            "input_norm": (hidden,), "post_norm": (hidden,),
            "qkv": packed(q_size + 2 * kv_size, hidden),
            "qkv_bias": (q_size + 2 * kv_size,), "q_norm": (head_dim,), "k_norm": (head_dim,),
            "o": packed(hidden, q_size), "o_bias": (hidden,),
            "gate_up": packed(2 * self.intermediate, hidden),
            "gate_up_bias": (2 * self.intermediate,),
            "down": packed(hidden, self.intermediate), "down_bias": (hidden,),
        }
        self._check(final_norm, (hidden,), "final_norm")
        q8_shapes = {"qkv": (q_size + 2 * kv_size, hidden), "o": (hidden, q_size),
                     "gate_up": (2 * self.intermediate, hidden),
                     "down": (hidden, self.intermediate)}
        table = torch.zeros((len(layers), len(LAYER_COLUMNS)), dtype=torch.int64)
        for i, layer in enumerate(layers):
            assert (layer.q_norm is None) == (layer.k_norm is None)
            assert dtype == torch.float32 or not any(layer.q8), "8-bit projections: fp32 only"
            amx = len(TENSOR_COLUMNS)
            table[i, amx:amx + 4] = torch.tensor(layer.amx_min_rows)
            for j, name in enumerate(TENSOR_COLUMNS):
                t = getattr(layer, name)
                if t is None:
                    continue
                if name in PROJECTIONS and layer.q8[PROJECTIONS.index(name)]:
                    four = cpu_quant.is_four_bit(t)
                    shape = cpu_quant.packed_shape(*q8_shapes[name], four)
                    assert t.dtype == torch.uint8 and t.device.type == "cpu", name
                    assert t.is_contiguous() and tuple(t.shape) == shape, (name, t.shape, shape)
                    table[i, amx + 4 + PROJECTIONS.index(name)] = 2 if four else 1
                elif name in ("key_cache", "value_cache"):
                    assert t.shape == self.cache_shape and t.stride() == self.cache_stride, name
                    assert t.dtype == dtype and t.device.type == "cpu", name
                else:
                    self._check(t, shapes[name], name)
                table[i, j] = t.data_ptr()
        self.table = table

    def _check(self, t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        assert t.dtype == self.dtype and t.device.type == "cpu", (name, t.dtype)
        assert t.is_contiguous() and tuple(t.shape) == shape, (name, tuple(t.shape), shape)


def decode_step(weights: DecoderTensors, embeddings: torch.Tensor,  # [rows, hidden]
                cos: torch.Tensor, sin: torch.Tensor,  # [rows, head_dim] (or [rows, 1, head_dim])
                slot_mapping: torch.Tensor,  # [rows] int64; negative: the K/V are not written
                block_table: torch.Tensor,  # [rows, max_blocks] int32: row i decodes sequence i
                seq_lens: torch.Tensor,  # [rows] int32, including this step's token
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Every layer and the final norm for `rows` decodes (one token each); writes each row's
    K/V into the layers' caches and returns the normed hidden states [rows, hidden]. A block
    id, length or slot outside the cache raises ValueError before anything is written."""
    lib = _library()
    assert lib is not None, "call available() first"
    rows = embeddings.shape[0]
    head_dim = weights.head_dim
    cos, sin = cos.reshape(rows, head_dim), sin.reshape(rows, head_dim)
    for t in (embeddings, cos, sin):
        assert t.dtype == weights.dtype and t.is_contiguous(), "the weights' dtype, contiguous"
    assert embeddings.shape == (rows, weights.hidden)
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    assert slot_mapping.shape == (rows,) and seq_lens.shape == (rows,)
    assert block_table.dim() == 2 and block_table.shape[0] == rows
    out = torch.empty_like(embeddings)
    num_blocks, block_size = weights.cache_shape[0], weights.cache_shape[1]
    step = getattr(lib, f"pagedserve_decode_step_{_SUFFIXES[weights.dtype]}")
    status = step(
        embeddings.data_ptr(), cos.data_ptr(), sin.data_ptr(), weights.table.data_ptr(),
        weights.final_norm.data_ptr(), slot_mapping.data_ptr(), block_table.data_ptr(),
        block_table.shape[1], seq_lens.data_ptr(), out.data_ptr(), rows, len(weights.layers),
        weights.hidden, weights.num_heads, weights.num_kv_heads, head_dim,
        weights.intermediate, num_blocks, block_size, weights.cache_stride[0],
        weights.cache_stride[1], weights.eps, scale, sliding_window or 0,
        torch.get_num_threads())
    if status == -1:
        raise ValueError(f"decoder_cpu: unsupported heads ({weights.num_heads} query heads, "
                         f"{weights.num_kv_heads} kv heads, head_dim {head_dim})")
    if status != 0:
        raise ValueError("decoder_cpu: a block id, sequence length or slot lies outside the "
                         "KV cache")
    return out

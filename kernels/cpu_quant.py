"""GEMMs with 8-bit weights on CPU through kernels/csrc/gemm_q8_cpu.cpp, from weights in
GGUF's Q8_0 blocks (32 values along the input with one fp16 scale each). `quantize_q8_0` makes
the blocks from a float weight, `pack_q8_0` the kernel's layout, `linear_q8_0` computes
F.linear with it: activations quantized per row and block of 32 on the fly, int8 dot products
(AVX512-VNNI where the CPU has it), fp32 out. kernels/reference.py `linear_q8_0` is the same
arithmetic in torch ops.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import native
from kernels.native import I32, I64, PTR

_NAME = "gemm_q8_cpu"
_SIGNATURES = {"pagedserve_gemm_q8_0_f32": ([PTR, I64, PTR, PTR, PTR, I64, I64, I32, I32, I32],
                                            None),
               "pagedserve_gemm_q8_0_vnni": ([], ctypes.c_int)}
BLOCK = 32  # values per scale
BLOCK_BYTES = 34  # a Q8_0 block: fp16 scale, 32 int8 values
_TILE_BYTES = 576  # a packed tile: 16 columns x one block (csrc/gemm_q8_cpu.cpp)


def _library() -> ctypes.CDLL | None:
    return native.load(_NAME, _SIGNATURES)


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def vnni() -> bool:
    """Whether the kernel was built with AVX512-VNNI dot products (else its plain loops)."""
    lib = _library()
    return lib is not None and bool(lib.pagedserve_gemm_q8_0_vnni())


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float (in a multiple of 32) -> Q8_0 blocks [out, in / 32 * 34] uint8: per block
    d = max|w| / 127, q = round(w * (1 / d)) (to nearest even), d kept as fp16."""
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(f"Q8_0 takes rows of a multiple of {BLOCK} values, not {in_features}")
    w = weight.detach().to(torch.float32).reshape(out_features, -1, BLOCK)
    d = w.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, 0.0, 1.0 / d)  # from the fp32 scale, as llama.cpp's quantizer
    q = (w * inv).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)],
                     dim=-1).reshape(out_features, -1)


def split_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks [out, in / 32 * 34] -> (scales [out, in / 32] fp16, values [out, in] int8)."""
    out_features = blocks.shape[0]
    raw = blocks.reshape(out_features, -1, BLOCK_BYTES)
    scales = raw[..., :2].contiguous().view(torch.float16).squeeze(-1)
    values = raw[..., 2:].contiguous().view(torch.int8).reshape(out_features, -1)
    return scales, values


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks -> the [out, in] fp32 weight they hold."""
    scales, values = split_q8_0(blocks)
    w = values.to(torch.float32).reshape(values.shape[0], -1, BLOCK)
    return (w * scales.to(torch.float32).unsqueeze(-1)).reshape(values.shape)


def pack_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [out, in / 32 * 34] -> the kernel's tiles [ceil(out / 16), in / 32, 576]
    uint8 (columns past `out` zero)."""
    scales, values = split_q8_0(blocks)
    out_features, in_features = values.shape
    nb, kb = -(-out_features // 16), in_features // BLOCK
    padded_v = values.new_zeros(nb * 16, in_features)
    padded_v[:out_features] = values
    padded_s = scales.new_zeros(nb * 16, kb)
    padded_s[:out_features] = scales
    v = padded_v.view(nb, 16, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(nb, kb, 512)
    s = padded_s.view(nb, 16, kb).transpose(1, 2).contiguous()
    sums = padded_v.view(nb, 16, kb, BLOCK).to(torch.int16).sum(-1, dtype=torch.int16)
    sums = sums.transpose(1, 2).contiguous()
    return torch.cat([v.view(torch.uint8), s.view(torch.uint8), sums.view(torch.uint8)],
                     dim=-1).contiguous()


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    return (-(-out_features // 16), in_features // BLOCK, _TILE_BYTES)


def linear_q8_0(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """F.linear for fp32 x [rows, in] with contiguous rows, from `pack_q8_0`; fp32 out."""
    lib = _library()
    assert lib is not None, "call available() first"
    rows, in_features = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and packed.is_contiguous()
    assert packed.dtype == torch.uint8
    assert packed.shape == packed_shape(out_features, in_features), packed.shape
    assert bias is None or (bias.is_contiguous() and bias.shape == (out_features,)
                            and bias.dtype == torch.float32)
    out = x.new_empty((rows, out_features))
    lib.pagedserve_gemm_q8_0_f32(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(),
                                 out.stride(0), rows, out_features, in_features,
                                 torch.get_num_threads())
    return out

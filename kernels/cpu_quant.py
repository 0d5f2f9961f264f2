"""GEMMs with 8-bit weights on CPU through kernels/csrc/gemm_q8_cpu.cpp, from weights in blocks
of 32 values along the input, each value d * q + m (int8 q; fp16 scale d and offset m per
block): GGUF's Q8_0 (m = 0), and its Q4_0 and Q4_1, whose 4-bit values are held as int8 (q - 8
and q), exactly. `quantize_q8_0` makes Q8_0 blocks from a float weight, `int8_blocks` turns a
GGUF block type into (scales, values, offsets), `pack_blocks` makes the kernel's layout,
`linear_q8_0` computes F.linear with it: activations quantized per row and block of 32 on the
fly, int8 dot products (AVX512-VNNI where the CPU has it), fp32 out. kernels/reference.py
`linear_q8_0` is the same arithmetic in torch ops.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "gemm_q8_cpu"
_SIGNATURES = {"pagedserve_gemm_q8_0_f32": ([PTR, I64, PTR, PTR, PTR, I64, I64, I32, I32, I32],
                                            None),
               "pagedserve_gemm_q8_0_vnni": ([], ctypes.c_int)}
BLOCK = 32  # values per scale
BLOCK_BYTES = 34  # a Q8_0 block: fp16 scale, 32 int8 values
_TILE_BYTES = 608  # a packed tile: 16 columns x one block (csrc/gemm_q8_cpu.cpp)
KINDS = ("Q8_0", "Q4_0", "Q4_1")  # the GGUF block types int8_blocks takes


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


def _split_q4(blocks: torch.Tensor, with_offset: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q4_0 (fp16 d, 16 bytes) or Q4_1 (fp16 d, fp16 m, 16 bytes) blocks: byte i holds value i
    in its low and value i + 16 in its high nibble."""
    out_features = blocks.shape[0]
    head = 4 if with_offset else 2
    raw = blocks.reshape(out_features, -1, head + 16)
    scales = raw[..., :2].contiguous().view(torch.float16).squeeze(-1)
    mins = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if with_offset else None
    qs = raw[..., head:].to(torch.int16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1) - (0 if with_offset else 8)
    return scales, q.to(torch.int8).reshape(out_features, -1), mins


def int8_blocks(kind: str, blocks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF block type (`KINDS`) as (scales [out, in / 32] fp16, values [out, in] int8,
    offsets [out, in / 32] fp16 or None)."""
    if kind == "Q8_0":
        return (*split_q8_0(blocks), None)
    if kind in ("Q4_0", "Q4_1"):
        return _split_q4(blocks, with_offset=kind == "Q4_1")
    raise ValueError(f"no 8-bit form of {kind}; takes {', '.join(KINDS)}")


def dequantize_blocks(scales: torch.Tensor, values: torch.Tensor,
                      mins: torch.Tensor | None = None) -> torch.Tensor:
    """The [out, in] fp32 weight that (scales, values, offsets) hold."""
    w = values.to(torch.float32).reshape(values.shape[0], -1, BLOCK)
    w = w * scales.to(torch.float32).unsqueeze(-1)
    if mins is not None:
        w = w + mins.to(torch.float32).unsqueeze(-1)
    return w.reshape(values.shape)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks -> the [out, in] fp32 weight they hold."""
    return dequantize_blocks(*split_q8_0(blocks))


def pack_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [out, in / 32 * 34] -> the kernel's tiles (`pack_blocks`)."""
    return pack_blocks(*split_q8_0(blocks))


def pack_blocks(scales: torch.Tensor, values: torch.Tensor,
                mins: torch.Tensor | None = None) -> torch.Tensor:
    """(scales, values, offsets) -> the kernel's tiles [ceil(out / 16), in / 32, 608] uint8
    (columns past `out` zero)."""
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
    padded_m = scales.new_zeros(nb * 16, kb)
    if mins is not None:
        padded_m[:out_features] = mins
    m = padded_m.view(nb, 16, kb).transpose(1, 2).contiguous()
    return torch.cat([v.view(torch.uint8), s.view(torch.uint8), sums.view(torch.uint8),
                      m.view(torch.uint8)], dim=-1).contiguous()


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    return (-(-out_features // 16), in_features // BLOCK, _TILE_BYTES)


def linear_q8_0(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """F.linear for fp32 x [rows, in] with contiguous rows, from `pack_blocks`; fp32 out."""
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

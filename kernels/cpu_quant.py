"""GEMMs with 8-bit weights on CPU through kernels/csrc/gemm_q8_cpu.cpp, from weights in blocks of
32 values along the input, each value d * q + m (int8 q; fp16 scale d and offset m per block):
GGUF's Q8_0 (m = 0), and its Q4_0, Q4_1, Q5_0 and Q5_1, whose 4- and 5-bit values are held
exactly (q; the _0 types' centring as the offset m = -8 d, -16 d), as int8 or, where a layer's
values all fit 4 bits, as nibbles. The k-quants Q4_K and Q5_K (super-blocks of 8 x 32 values
with 6-bit scales and mins) take the same form with their values exact and d = d_super * scale,
m = -dmin * min rounded to fp16 (a relative 2^-11: well under 1% of a 4-bit step); Q6_K, whose
16-value sub-blocks each have a scale, is requantized to Q8_0 (lossy: docs/cpu-kernels.md).
`quantize_q8_0` makes Q8_0 blocks from a float weight, `int8_blocks` turns a GGUF block type
into (scales, values, offsets), `pack_blocks` makes the kernel's layout, `linear_q8_0` computes
F.linear with it: activations quantized per row and block of 32 on the fly, int8 dot products
(AVX512-VNNI where the CPU has it), fp32 out. kernels/reference.py `linear_q8_0` is the same
arithmetic in torch ops."""

from __future__ import annotations

import ctypes

import torch

from pagedserve_kernels import native
from pagedserve_kernels.native import I32, I64, PTR

_NAME = "gemm_q8_cpu"
_SIGNATURES = {"pagedserve_gemm_q8_0_f32": ([PTR, I64, PTR, PTR, PTR, I64, I64, I32, I32, I32,
                                             I32], None),
               "pagedserve_gemm_q8_0_vnni": ([], ctypes.c_int)}
BLOCK = 32  # values per scale
BLOCK_BYTES = 34  # a Q8_0 block: fp16 scale, 32 int8 values
_TILE_BYTES = 608  # a packed tile: 16 columns x one block (csrc/gemm_q8_cpu.cpp)
TILE_BYTES_4 = 352  # the same with 4-bit values, two a byte
# the GGUF block types int8_blocks takes
KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_K_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # a k-quant super-block of 256 values


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


def _split_4_5_bit(blocks: torch.Tensor, kind: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0 (fp16 d) or Q4_1/Q5_1 (fp16 d, fp16 m), then for Q5 4 bytes of fifth bits
    (bit i of the little-endian word for value i), then 16 bytes: byte i holds value i in its
    low and value i + 16 in its high nibble. The _0 types centre q (- 8, - 16): held as the
    offset -8 d (-16 d), so that every 4-bit type's values are 0..15."""
    out_features = blocks.shape[0]
    with_offset, five = kind.endswith("_1"), kind.startswith("Q5")
    head = (4 if with_offset else 2) + (4 if five else 0)
    raw = blocks.reshape(out_features, -1, head + 16)
    scales = raw[..., :2].contiguous().view(torch.float16).squeeze(-1)
    qs = raw[..., head:].to(torch.int16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
    if five:
        qh = raw[..., head - 4:head].to(torch.int16)  # 4 bytes: values 8b .. 8b + 7 in byte b
        bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1
        q = q + (bits.reshape(*q.shape) << 4)
    mins = (raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if with_offset
            else scales * -(16 if five else 8))  # d (q - c) = d q + (-c d): exact in fp16
    return scales, q.to(torch.int8).reshape(out_features, -1), mins


def _k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> ([..., 8], [..., 8]) int16: bytes 0-3
    and 4-7 hold sub-blocks 0-3's scales and mins in their low 6 bits; sub-blocks 4-7 take bytes
    8-11's nibbles plus those bytes' top 2 bits."""
    s = raw.to(torch.int16)
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=-1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return scales, mins


def _split_k(blocks: torch.Tensor, kind: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K (fp16 d, dmin, 12 scale bytes, 128 nibble bytes) or Q5_K (the same with 32 bytes of
    fifth bits before the nibbles): 32-byte group j holds sub-block 2j in its low and 2j + 1 in
    its high nibbles; bit k of fifth-bit byte i belongs to value i of sub-block k."""
    out_features = blocks.shape[0]
    raw = blocks.reshape(out_features, -1, _K_BYTES[kind])
    n = raw.shape[1]
    d = raw[..., 0:2].contiguous().view(torch.float16).to(torch.float32)
    dmin = raw[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
    sc, m = _k_scales(raw[..., 4:16])
    qs = raw[..., -128:].to(torch.int16).view(out_features, n, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-2).view(out_features, n, 8, 32)
    if kind == "Q5_K":
        qh = raw[..., 16:48].to(torch.int16).view(out_features, n, 1, 32)
        q = q + (((qh >> torch.arange(8, dtype=torch.int16).view(8, 1)) & 1) << 4)
    scales = (d * sc).to(torch.float16).reshape(out_features, -1)
    mins = (-(dmin * m)).to(torch.float16).reshape(out_features, -1)
    return scales, q.to(torch.int8).reshape(out_features, -1), mins


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [out, in / 256 * 210] (128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8
    scales, fp16 d) -> the [out, in] fp32 weight, d * scale * (q - 32) per 16 values. Within
    each half of 128 values, 32-value group g takes nibble g // 2 of byte set g % 2 and bits
    2g..2g+1 of the high bytes."""
    out_features = blocks.shape[0]
    raw = blocks.reshape(out_features, -1, _K_BYTES["Q6_K"])
    n = raw.shape[1]
    ql = raw[..., 0:128].to(torch.int16).view(out_features, n, 2, 2, 32)
    qh = raw[..., 128:192].to(torch.int16).view(out_features, n, 2, 1, 32)
    sc = raw[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = raw[..., 208:210].contiguous().view(torch.float16).to(torch.float32)
    nib = torch.cat([ql & 0xF, ql >> 4], dim=-2)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int16).view(4, 1)) & 3
    q = (nib | (high << 4)) - 32
    w = q.to(torch.float32).view(out_features, n, 16, 16) * (d * sc).unsqueeze(-1)
    return w.reshape(out_features, -1)


def int8_blocks(kind: str, blocks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF block type (`KINDS`) as (scales [out, in / 32] fp16, values [out, in] int8,
    offsets [out, in / 32] fp16 or None)."""
    if kind == "Q8_0":
        return (*split_q8_0(blocks), None)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return _split_4_5_bit(blocks, kind)
    if kind in ("Q4_K", "Q5_K"):
        return _split_k(blocks, kind)
    if kind == "Q6_K":
        return (*split_q8_0(quantize_q8_0(dequantize_q6_k(blocks))), None)
    raise ValueError(f"no 8-bit form of {kind}; takes {', '.join(KINDS)}")


def dequantize_blocks(scales: torch.Tensor, values: torch.Tensor,
                      mins: torch.Tensor | None = None) -> torch.Tensor:
    """The [out, in] fp32 weight that (scales, values, offsets) hold."""
    w = values.to(torch.float32).reshape(values.shape[0], -1, BLOCK)
    w = w * scales.to(torch.float32).unsqueeze(-1)
    if mins is not None:
        w = w + mins.to(torch.float32).unsqueeze(-1)
    return w.reshape(values.shape)


def dequantize(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """The [out, in] fp32 weight a GGUF block type (`KINDS`) holds: exact (for Q6_K too, which
    int8_blocks requantizes)."""
    if kind == "Q6_K":
        return dequantize_q6_k(blocks)
    return dequantize_blocks(*int8_blocks(kind, blocks))


def pack_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [out, in / 32 * 34] -> the kernel's tiles (`pack_blocks`)."""
    return pack_blocks(*split_q8_0(blocks))


def pack_blocks(scales: torch.Tensor, values: torch.Tensor,
                mins: torch.Tensor | None = None, four: bool | None = None) -> torch.Tensor:
    """(scales, values, offsets) -> the kernel's tiles [ceil(out / 16), in / 32, 608] uint8,
    or 4-bit tiles [..., 352] (`four`; None: where every value is in 0..15); columns past `out`
    zero."""
    out_features, in_features = values.shape
    nb, kb = -(-out_features // 16), in_features // BLOCK
    fits = bool(values.numel()) and int(values.min()) >= 0 and int(values.max()) <= 15
    assert fits or not four, "4-bit tiles take values 0..15"
    four = fits if four is None else four
    padded_v = values.new_zeros(nb * 16, in_features)
    padded_v[:out_features] = values
    padded_s = scales.new_zeros(nb * 16, kb)
    padded_s[:out_features] = scales
    v = padded_v.view(nb, 16, kb, 8, 4).permute(0, 2, 3, 1, 4)
    if four:  # groups j and j + 4 share a byte: j low, j + 4 high
        u = v.to(torch.uint8)
        v = (u[:, :, :4] | (u[:, :, 4:] << 4)).reshape(nb, kb, 256)
    else:
        v = v.reshape(nb, kb, 512)
    s = padded_s.view(nb, 16, kb).transpose(1, 2).contiguous()
    sums = padded_v.view(nb, 16, kb, BLOCK).to(torch.int16).sum(-1, dtype=torch.int16)
    sums = sums.transpose(1, 2).contiguous()
    padded_m = scales.new_zeros(nb * 16, kb)
    if mins is not None:
        padded_m[:out_features] = mins
    m = padded_m.view(nb, 16, kb).transpose(1, 2).contiguous()
    return torch.cat([v.view(torch.uint8), s.view(torch.uint8), sums.view(torch.uint8),
                      m.view(torch.uint8)], dim=-1).contiguous()


def packed_shape(out_features: int, in_features: int, four: bool = False
                 ) -> tuple[int, int, int]:
    return (-(-out_features // 16), in_features // BLOCK, TILE_BYTES_4 if four else _TILE_BYTES)


def is_four_bit(packed: torch.Tensor) -> bool:
    """Whether pack_blocks made 4-bit tiles."""
    return packed.shape[-1] == TILE_BYTES_4


def linear_q8_0(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """F.linear for fp32 x [rows, in] with contiguous rows, from `pack_blocks`; fp32 out."""
    lib = _library()
    assert lib is not None, "call available() first"
    rows, in_features = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and packed.is_contiguous()
    assert packed.dtype == torch.uint8
    four = is_four_bit(packed)
    assert packed.shape == packed_shape(out_features, in_features, four), packed.shape
    assert bias is None or (bias.is_contiguous() and bias.shape == (out_features,)
                            and bias.dtype == torch.float32)
    out = x.new_empty((rows, out_features))
    lib.pagedserve_gemm_q8_0_f32(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(),
                                 out.stride(0), rows, out_features, in_features, int(four),
                                 torch.get_num_threads())
    return out

"""`quant_gemm.linear_blocks` (interpreted on CPU) against `reference.linear_blocks`, the 4-bit
layout of `pack_nibbles`, and the wrapper's argument checks.

Cases: every dtype x layout x M in {1, 5, 16, 33} x K in {32, 96, 256}, with N 40 or 72 (never a
multiple of BLOCK_N) and mins / bias (x's dtype or fp32) varied across them. Two bounds per case:
the relative error of the whole output, and per element |out - ref| <= tol * (|x| @ |w|^T +
|bias|), the size of the terms each output sums.

bf16: the interpreter's tl.dot is wrong on bf16 operands (it multiplies the raw uint16 bits), so
under TRITON_INTERPRET=1 the wrapper loads bf16 x and upcasts it to fp32 in the kernel (UPCAST, as
paged_attention does). These cases check everything but the bf16 dot itself (loads, masks,
dequantization, bias, the output cast); that dot is checked by the sm_80 / sm_90 compiles of
test_aot.py only. The interpreter's fp32 -> bf16 cast truncates instead of rounding (up to 2^-7
relative per element, ~4e-3 over an output), hence bf16's looser bound.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedserve_kernels import reference
from pagedserve_kernels.quant_gemm import kernel_constexprs, linear_blocks, pack_nibbles

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}


def make_weight(num_out: int, num_in: int, bits: int, with_mins: bool, gen: torch.Generator):
    """(values, scales, mins): int8 in -128..127 or packed nibbles; fp16 scales and mins."""
    if bits == 8:
        values = torch.randint(-128, 128, (num_out, num_in), generator=gen, dtype=torch.int8)
    else:
        values = pack_nibbles(torch.randint(0, 16, (num_out, num_in), generator=gen,
                                            dtype=torch.uint8))
    groups = num_in // 32
    scales = (torch.rand(num_out, groups, generator=gen) * 0.02 + 0.001).half()
    mins = (torch.randn(num_out, groups, generator=gen) * 0.05).half() if with_mins else None
    return values, scales, mins


def dense_weight(values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None):
    q = reference.unpack_nibbles(values) if values.dtype == torch.uint8 else values
    w = q.float().reshape(q.shape[0], -1, 32) * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(q.shape)


def check(out: torch.Tensor, ref: torch.Tensor, x, values, scales, mins, bias, dtype: str):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]}"
    size = x.float().abs() @ dense_weight(values, scales, mins).abs().T
    if bias is not None:
        size = size + bias.float().abs()
    excess = (out.float() - ref.float()).abs() - TOL[dtype] * size - 1e-30
    assert excess.max() <= 0, f"element error over its bound by {excess.max():.3e}"


def case_list():
    cases = []
    for i, (dtype, bits, m, k) in enumerate(itertools.product(DTYPES, (4, 8), (1, 5, 16, 33),
                                                              (32, 96, 256))):
        n = (40, 72)[i % 2]
        with_mins = (i // 2) % 2 == 0
        bias = (None, "x", "fp32")[i % 3]
        cases.append((dtype, bits, m, n, k, with_mins, bias))
    return cases


CASES = case_list()


def run(dtype: str, bits: int, m: int, n: int, k: int, with_mins: bool, bias_dtype, seed: int,
        row_stride: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    if row_stride is None:
        x = torch.randn(m, k, generator=gen).to(dt)
    else:  # a column slice of a wider tensor, starting past its first column
        x = torch.randn(m, row_stride, generator=gen).to(dt)[:, 8:8 + k]
    values, scales, mins = make_weight(n, k, bits, with_mins, gen)
    bias = None
    if bias_dtype is not None:
        bias = torch.randn(n, generator=gen).to(dt if bias_dtype == "x" else torch.float32)
    out = linear_blocks(x, values, scales, mins, bias)
    ref = reference.linear_blocks(x, values, scales, mins, bias)
    check(out, ref, x, values, scales, mins, bias, dtype)
    return out


@pytest.mark.parametrize("dtype,bits,m,n,k,with_mins,bias", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_matches_reference(dtype, bits, m, n, k, with_mins, bias, launches):
    run(dtype, bits, m, n, k, with_mins, bias, seed=m * 1000 + n * 10 + k + bits)
    meta = kernel_constexprs(m, k, bits == 4, with_mins, bias is not None)
    assert launches.launches == [("linear_blocks_kernel",
                                  (-(-n // meta["BLOCK_N"]), -(-m // meta["BLOCK_M"])))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (4, 8))
def test_strided_x(dtype, bits):
    """x with a row stride larger than K (and not a multiple of 16), unaligned start."""
    run(dtype, bits, 33, 72, 96, True, "x", seed=7, row_stride=96 + 45)


@pytest.mark.parametrize("bits", (4, 8))
def test_strided_weight(bits):
    """values, scales and mins as row slices of wider tensors (row strides beyond their width)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen)
    wide = list(make_weight(40, 128, bits, True, gen))
    values = wide[0][:, :wide[0].shape[1] // 2]
    scales, mins = wide[1][:, :2], wide[2][:, 1:3]
    assert values.stride(0) > values.shape[1] and mins.stride(0) > 2
    out = linear_blocks(x, values, scales, mins)
    ref = reference.linear_blocks(x, values, scales, mins)
    check(out, ref, x, values, scales, mins, None, "fp32")


def test_decode_gets_small_tiles():
    assert kernel_constexprs(1, 576, True, False, False)["BLOCK_M"] == 16
    assert kernel_constexprs(16, 576, False, False, False)["BLOCK_M"] == 16
    assert kernel_constexprs(512, 576, False, False, False)["BLOCK_M"] > 16
    for m, k in itertools.product((1, 24, 512), (32, 96, 576, 1536)):
        block_k = kernel_constexprs(m, k, True, True, True)["BLOCK_K"]
        assert block_k % 32 == 0 and block_k & (block_k - 1) == 0 and block_k <= 128


def test_four_bit_equals_eight_bit_on_the_same_values():
    """The nibble path and the int8 path agree on the same q (0..15), bit for bit in fp32."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (72, 256), generator=gen, dtype=torch.int8)
    _, scales, mins = make_weight(72, 256, 8, True, gen)
    x = torch.randn(5, 256, generator=gen)
    four = linear_blocks(x, pack_nibbles(q), scales, mins)
    eight = linear_blocks(x, q, scales, mins)
    assert torch.allclose(four, eight, rtol=1e-6, atol=1e-6)


def test_empty_batch_launches_nothing(launches):
    values, scales, _ = make_weight(40, 64, 4, False, torch.Generator().manual_seed(0))
    out = linear_blocks(torch.empty(0, 64), values, scales)
    assert out.shape == (0, 40) and launches.launches == []


def test_pack_nibbles_layout_and_round_trip():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (6, 96), generator=gen, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 48)
    for b in range(3):  # the byte layout, spelled out: GGUF Q4_0's
        for j in range(16):
            assert torch.equal(packed[:, 16 * b + j], q[:, 32 * b + j] | q[:, 32 * b + j + 16] << 4)
    assert torch.equal(reference.unpack_nibbles(packed), q)
    assert torch.equal(pack_nibbles(q.to(torch.int8)), packed)
    all_bytes = torch.arange(256, dtype=torch.uint8).repeat(2).view(16, 32)
    assert torch.equal(pack_nibbles(reference.unpack_nibbles(all_bytes)), all_bytes)


@pytest.mark.parametrize("bad,match", [
    (torch.full((2, 32), 16, dtype=torch.uint8), r"0\.\.15"),
    (torch.full((2, 32), -1, dtype=torch.int8), r"0\.\.15"),
    (torch.zeros(2, 48, dtype=torch.uint8), r"multiple of 32"),
    (torch.zeros(2, 32), r"int8 or uint8"),
])
def test_pack_nibbles_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_nibbles(bad)


def good_args() -> dict:
    gen = torch.Generator().manual_seed(0)
    values, scales, mins = make_weight(40, 64, 4, True, gen)
    return dict(x=torch.randn(3, 64, generator=gen), values=values, scales=scales, mins=mins,
                bias=torch.randn(40, generator=gen))


ERROR_CASES = {
    "K not a multiple of 32": (dict(x=lambda a: torch.randn(3, 48)),
                               r"K \(x.shape\[1\]\) must be a positive multiple of 32, got 48"),
    "x 1-D": (dict(x=lambda a: a["x"][0]), r"x must be a 2-D float32"),
    "x float64": (dict(x=lambda a: a["x"].double()), r"got torch.float64"),
    "x int": (dict(x=lambda a: a["x"].to(torch.int32)), r"got torch.int32"),
    "x strided along K": (dict(x=lambda a: torch.randn(3, 128)[:, ::2]),
                          r"x must have unit stride along K"),
    "values float": (dict(values=lambda a: a["values"].half()),
                     r"values must be 2-D int8 \[N, K\] or uint8"),
    "values int8 of K // 2": (dict(values=lambda a: a["values"].to(torch.int8)),
                              r"values must be int8 \[N, K=64\] for K=64, got \(40, 32\)"),
    "values uint8 of K": (dict(values=lambda a: torch.zeros(40, 64, dtype=torch.uint8)),
                          r"uint8 \(4-bit nibbles\) \[N, K // 2=32\]"),
    "values strided": (dict(values=lambda a: torch.zeros(40, 64, dtype=torch.uint8)[:, ::2]),
                       r"values must have unit stride along K"),
    "scales shape": (dict(scales=lambda a: a["scales"][:, :1]),
                     r"scales must be float16 \[N=40, K // 32=2\], got torch.float16 \(40, 1\)"),
    "scales rows": (dict(scales=lambda a: a["scales"][:39]), r"scales must be float16"),
    "scales float32": (dict(scales=lambda a: a["scales"].float()),
                       r"scales must be float16 .* got torch.float32"),
    "scales strided": (dict(scales=lambda a: a["scales"].t().contiguous().t()),
                       r"scales must have unit stride along K // 32"),
    "mins shape": (dict(mins=lambda a: a["mins"][:, :1]), r"mins must be float16"),
    "mins bf16": (dict(mins=lambda a: a["mins"].bfloat16()), r"mins must be float16"),
    "bias shape": (dict(bias=lambda a: a["bias"][:39]), r"bias must be \[N=40\]"),
    "bias dtype": (dict(bias=lambda a: a["bias"].half()),
                   r"bias must be \[N=40\] in x's dtype \(torch.float32\) or float32"),
    "bias strided": (dict(bias=lambda a: torch.randn(80)[::2]), r"bias must have unit stride"),
    "another device": (dict(scales=lambda a: a["scales"].to("meta")),
                       r"all tensors must be on one device, got \['cpu', 'meta'\]"),
}


@pytest.mark.parametrize("change,match", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_rejects(change, match, launches):
    args = good_args()
    args |= {k: f(args) for k, f in change.items()}
    with pytest.raises(ValueError, match=match):
        linear_blocks(**args)
    assert launches.launches == []

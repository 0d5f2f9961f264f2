"""The 8-bit CPU GEMM (kernels/cpu_quant.py, csrc/gemm_q8_cpu.cpp) against its torch reference
(kernels/reference.py `linear_q8_0`) and against plain F.linear, with VNNI where this CPU has
it and with the plain-loop fallback built for any CPU; the Q8_0 blocks against the `gguf`
package's own (de)quantizer, and the other GGUF block types against its dequantizer."""

from __future__ import annotations

import ctypes
import subprocess

import gguf
import numpy as np
import pytest
import torch

from pagedserve_kernels import cpu_quant, native, reference
from tests.gguf_factory import random_k_blocks


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_quant.available(), "the 8-bit GEMM must build here"


def _case(rows, k, n, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0
    x = torch.randn(rows, k, generator=gen)
    if rows > 1:
        x[1, 32:64] = 0.0
    b = torch.randn(n, generator=gen) if bias else None
    return w, x, b


SHAPES = [(1, 32, 1), (2, 64, 17), (3, 64, 40), (4, 96, 16), (5, 576, 960), (9, 1536, 576),
          (64, 576, 200), (1, 576, 49152 + 7)]


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_reference_and_approximates_float(rows, k, n, bias):
    w, x, b = _case(rows, k, n, seed=rows * 1000 + n, bias=bias)
    blocks = cpu_quant.quantize_q8_0(w)
    out = cpu_quant.linear_q8_0(x, cpu_quant.pack_q8_0(blocks), b, n)
    scales, values = cpu_quant.split_q8_0(blocks)
    expected = reference.linear_q8_0(x, scales, values, b)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.linear(x, w, b)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max() + 1e-3


def test_strided_rows():
    w, x, b = _case(6, 128, 48, seed=7)
    wide = torch.zeros(6, 200)
    wide[:, 10:138] = x
    view = wide[:, 10:138]
    packed = cpu_quant.pack_q8_0(cpu_quant.quantize_q8_0(w))
    torch.testing.assert_close(cpu_quant.linear_q8_0(view, packed, b, 48),
                               cpu_quant.linear_q8_0(x.contiguous(), packed, b, 48))


def test_blocks_match_the_gguf_package():
    w = (torch.randn(24, 96) * 0.1).numpy()
    theirs = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    ours = cpu_quant.quantize_q8_0(torch.from_numpy(w))
    assert ours.shape == theirs.shape
    # round-half-to-even here, half-away-from-zero there: ties of random floats are absent
    assert torch.equal(ours, theirs)
    np.testing.assert_array_equal(
        cpu_quant.dequantize("Q8_0", theirs).numpy(),
        gguf.quants.dequantize(theirs.numpy(), gguf.GGMLQuantizationType.Q8_0))


def test_bad_inner_size_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_quant.quantize_q8_0(torch.zeros(4, 40))


def test_the_plain_loop_fallback_gives_the_same_sums(tmp_path):
    """The kernel built without VNNI (as on a CPU without it) runs the plain loops."""
    compiler = native._compiler()
    assert compiler is not None
    lib_path = tmp_path / "q8_fallback.so"
    source = native.SOURCE_DIR / "gemm_q8_cpu.cpp"
    subprocess.run([compiler, *native.FLAGS, "-mno-avx512vnni", "-o", str(lib_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(lib_path))
    for name, (args, restype) in cpu_quant._SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, restype
    assert lib.pagedserve_gemm_q8_0_vnni() == 0
    for (rows, k, n), kind in zip([(3, 64, 40), (5, 576, 33), (4, 96, 17)],
                                  ["Q8_0", "Q8_0", "Q4_1"]):
        w, x, b = _case(rows, k, n, seed=n)
        raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind]))
        form = cpu_quant.int8_blocks(kind, raw)
        packed = cpu_quant.pack_blocks(*form)
        assert cpu_quant.is_four_bit(packed) == (kind == "Q4_1")
        out = torch.empty(rows, n)
        lib.pagedserve_gemm_q8_0_f32(x.data_ptr(), x.stride(0), packed.data_ptr(), b.data_ptr(),
                                     out.data_ptr(), out.stride(0), rows, n, k,
                                     int(cpu_quant.is_four_bit(packed)), 2)
        torch.testing.assert_close(out, reference.linear_q8_0(x, form[0], form[1], b, form[2]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_4_and_5_bit_blocks_as_int8_equal_the_gguf_package_and_the_reference(kind):
    """Q4_0, Q4_1, Q5_0 and Q5_1 held exactly as int8 values (with the _1 types' per-block
    offset)."""
    qtype = gguf.GGMLQuantizationType[kind]
    w = (torch.randn(40, 96) * 0.1).numpy()
    raw = gguf.quants.quantize(w, qtype)
    scales, values, mins = cpu_quant.int8_blocks(kind, torch.from_numpy(raw))
    assert mins is not None  # the _0 types' centring too: -8 d, -16 d
    assert int(values.min()) >= 0 and int(values.max()) <= (15 if kind[1] == "4" else 31)
    np.testing.assert_array_equal(cpu_quant.dequantize_blocks(scales, values, mins).numpy(),
                                  gguf.quants.dequantize(raw, qtype))
    x, b = torch.randn(5, 96), torch.randn(40)
    packed = cpu_quant.pack_blocks(scales, values, mins)
    assert cpu_quant.is_four_bit(packed) == kind.startswith("Q4")  # nibbles in the tiles
    out = cpu_quant.linear_q8_0(x, packed, b, 40)
    torch.testing.assert_close(out, reference.linear_q8_0(x, scales, values, b, mins),
                               rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.linear(x, torch.from_numpy(gguf.quants.dequantize(raw, qtype)),
                                       b)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max() + 1e-3


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_as_int8_hold_the_gguf_packages_values(kind):
    """Q4_K and Q5_K keep their values exactly, with scale and offset per 32 values rounded to
    fp16; Q6_K is dequantized exactly and its 8-bit form is a Q8_0 requantization."""
    qtype = gguf.GGMLQuantizationType[kind]
    raw = random_k_blocks((40, 512), kind, seed=3)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(40, 512)
    blocks = torch.from_numpy(raw)
    scales, values, mins = cpu_quant.int8_blocks(kind, blocks)
    held = cpu_quant.dequantize_blocks(scales, values, mins)
    peak = theirs.reshape(40, -1, 32).abs().amax(-1, keepdim=True)
    error = (held - theirs).reshape(40, -1, 32).abs()
    if kind == "Q6_K":
        assert mins is None
        torch.testing.assert_close(cpu_quant.dequantize(kind, blocks), theirs, rtol=0, atol=0)
        requantized = cpu_quant.dequantize("Q8_0", cpu_quant.quantize_q8_0(theirs))
        torch.testing.assert_close(held, requantized, rtol=0, atol=0)
        assert (error <= peak / 127).all()  # a Q8_0 step (scales near fp16's subnormals)
    else:
        assert mins is not None and int(values.min()) >= 0
        assert int(values.max()) <= (15 if kind == "Q4_K" else 31)
        assert (error <= peak * 2.0 ** -9).all()  # fp16 scale and offset: far below a 4-bit step
        torch.testing.assert_close(cpu_quant.dequantize(kind, blocks), held, rtol=0, atol=0)
    x, b = torch.randn(5, 512), torch.randn(40)
    packed = cpu_quant.pack_blocks(scales, values, mins)
    assert cpu_quant.is_four_bit(packed) == (kind == "Q4_K")
    out = cpu_quant.linear_q8_0(x, packed, b, 40)
    torch.testing.assert_close(out, reference.linear_q8_0(x, scales, values, b, mins),
                               rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.linear(x, theirs, b)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max() + 1e-3

"""kernels.cpu_linear (kernels/csrc/gemm_cpu.cpp) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve_kernels import cpu_linear
from tests.kernels.test_cpu_attention import needs_compiler

pytestmark = needs_compiler


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 40, 64])  # 8-row passes: 1, 2, 5, 8
# 16-column blocks in groups of 3: one group; 5 groups, the last of 1 block; a last one of 2
@pytest.mark.parametrize("out_features,in_features", [(48, 64), (200, 96), (7, 1536), (80, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features + 3, generator=g)[:, :in_features]  # rows with a stride
    packed = cpu_linear.pack(weight)
    assert packed.shape == (-(-out_features // 16), in_features, 16)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    ours = (cpu_linear.linear(x, packed, b, out_features).double() - exact).abs().max()
    torchs = (F.linear(x, weight, b).double() - exact).abs().max()
    assert ours <= 4 * torchs + 1e-6, (ours, torchs)  # fp32 rounding, as F.linear's


def test_pack_pads_the_last_block_with_zeros():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = cpu_linear.pack(weight)
    assert packed.shape == (2, 3, 16)
    torch.testing.assert_close(packed[0].t(), weight[:16])
    torch.testing.assert_close(packed[1, :, :4].t(), weight[16:])
    assert not packed[1, :, 4:].any()


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 40, 64])
@pytest.mark.parametrize("out_features,in_features", [(48, 64), (200, 96), (7, 1536), (80, 34)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amx_min_rows", [1, 1 << 30])
def test_bf16_matches_f_linear(rows, out_features, in_features, bias, amx_min_rows):
    """fp32 sums rounded once to bf16, as torch's bf16 F.linear: equal but for an ulp where
    the sums' order differs (with AVX512_BF16, measured bit-equal at SmolLM2's shapes). On
    AMX tiles where the CPU has them (and `in` % 32 == 0), and on the vector tiles."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, in_features + 2, generator=g).bfloat16()[:, :in_features]
    packed = cpu_linear.pack(weight)
    assert packed.shape == (-(-out_features // 16), in_features // 2, 16, 2)
    ours = cpu_linear.linear(x, packed, b, out_features, amx_min_rows)
    assert ours.dtype == torch.bfloat16
    torchs = F.linear(x, weight, b).double()
    # One bf16 ulp (8 bits of mantissa), or, where the sum cancels to near 0, what two fp32
    # orders of summing can differ by: a few fp32 ulps of the terms' magnitude.
    magnitude = x.double().abs() @ weight.double().abs().T
    ulp = torch.maximum(torchs.abs() * 2 ** -7, magnitude * 2 ** -20)
    assert ((ours.double() - torchs).abs() <= ulp).all()
    assert (ours.double() != torchs).float().mean() < 0.02


def test_bf16_pack_pairs_the_inputs_of_each_column():
    weight = torch.arange(17 * 4, dtype=torch.float32).view(17, 4).bfloat16()
    packed = cpu_linear.pack(weight)
    assert packed.shape == (2, 2, 16, 2)
    assert torch.equal(packed[0, 1, 3], weight[3, 2:4])  # column 3, inputs 2 and 3
    assert torch.equal(packed[1, 0, 0], weight[16, 0:2])
    assert not packed[1, :, 1:].any()
    with pytest.raises(RuntimeError, match="even number of inputs"):
        cpu_linear.pack(torch.zeros(4, 3, dtype=torch.bfloat16))

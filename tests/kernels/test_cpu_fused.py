"""kernels.cpu_fused (kernels/csrc/fused_cpu.cpp) against the torch code it replaces, fp32 and
bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve_kernels import cpu_fused, reference
from pagedserve_kernels.reference import rotary as rotate
from server.models.layers.rotary import RotaryEmbedding
from tests.kernels.test_cpu_attention import needs_compiler

pytestmark = needs_compiler

# 1-3 rows stay on one thread; 200 x 576 is past the threshold where rows are split over threads
SHAPES = [(1, 64), (3, 576), (200, 576), (7, 100)]


def rows_view(rows: int, cols: int, seed: int, pad: int = 0) -> torch.Tensor:
    """[rows, cols] with a row stride of cols + pad (a column slice of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols + pad, generator=g) * 3)[:, :cols]


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_library_builds():
    assert cpu_fused.available()


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("pad", [0, 5])
def test_add_rms_norm(rows, cols, pad):
    x, residual = rows_view(rows, cols, 1, pad), rows_view(rows, cols, 2, pad)
    weight = torch.randn(cols)
    expected_sum = residual + x
    expected = torch_rms_norm(expected_sum, weight, 1e-6)
    out = cpu_fused.add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, expected_sum, rtol=0, atol=0)  # the add is exact
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    before = residual.clone()
    torch.testing.assert_close(cpu_fused.add_rms_norm(None, residual, weight, 1e-6),
                               torch_rms_norm(before, weight, 1e-6), rtol=1e-5, atol=1e-6)
    assert torch.equal(residual, before)  # no x: the residual is only read


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("pad", [0, 3])
def test_silu_and_mul(rows, cols, pad):
    x = rows_view(rows, 2 * cols, 3, pad)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.5])  # saturated ends of the exp
    expected = F.silu(x[:, :cols]) * x[:, cols:]
    torch.testing.assert_close(cpu_fused.silu_and_mul(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,heads,head_dim", [(1, 3, 64), (5, 12, 64), (130, 12, 128)])
def test_rotary_in_place(rows, heads, head_dim):
    rope = RotaryEmbedding(head_dim, 4096, 10000.0)
    positions = torch.randint(0, 4096, (rows,))
    cos, sin = rope.cos_sin(positions, torch.float32)
    qkv = rows_view(rows, (heads + 2) * head_dim, 4)  # q and k heads, then a v head left alone
    qk = qkv[:, :heads * head_dim].view(rows, heads, head_dim)
    expected = rotate(qk.clone(), cos, sin)
    v_before = qkv[:, heads * head_dim:].clone()
    assert cpu_fused.rotary_(qk, cos, sin) is qk
    torch.testing.assert_close(qk, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, heads * head_dim:], v_before)


def assert_bf16_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The bits of the torch code (kernels.reference, as transformers rounds), but for fp32
    sums taken in another order (and another exp) now and then rounding the other way: one
    bf16 step at most, in at most 0.1% of the values (and below 1e-30, where the exp clamps,
    anything that small)."""
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == expected.shape
    a, b = out.float(), expected.float()
    step = (b.abs() * 2.0 ** -7).clamp(min=1e-30)  # >= one bf16 ulp at b
    assert ((a - b).abs() <= step).all(), (a - b).abs().max()
    assert ((a - b).abs() > 1e-30).float().mean() <= 1e-3


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_bf16_rows_round_as_the_torch_code(rows, cols):
    x = rows_view(rows, cols, 1, 3).bfloat16()
    residual = rows_view(rows, cols, 2).bfloat16()
    weight = torch.randn(cols).bfloat16()
    expected_residual = residual.clone()
    expected = reference.rms_norm(x, weight, 1e-6, expected_residual)
    assert_bf16_matches(cpu_fused.add_rms_norm(x, residual, weight, 1e-6), expected)
    assert torch.equal(residual, expected_residual)  # one rounding of the sum, as torch's add
    assert_bf16_matches(cpu_fused.add_rms_norm(None, residual, weight, 1e-6),
                        reference.rms_norm(residual, weight, 1e-6))
    gate_up = rows_view(rows, 2 * cols, 3).bfloat16()
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    assert_bf16_matches(cpu_fused.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))


@pytest.mark.parametrize("rows,heads,head_dim", [(1, 3, 64), (130, 12, 128)])
def test_bf16_rotary(rows, heads, head_dim):
    cos, sin = RotaryEmbedding(head_dim, 4096, 10000.0).cos_sin(
        torch.randint(0, 4096, (rows,)), torch.bfloat16)
    qk = rows_view(rows, heads * head_dim, 4).bfloat16().view(rows, heads, head_dim)
    expected = reference.rotary(qk.clone(), cos, sin)
    assert_bf16_matches(cpu_fused.rotary_(qk, cos, sin), expected)


def test_supports_fp32_and_bf16_rows():
    assert cpu_fused.supports(torch.zeros(2, 8))
    assert cpu_fused.supports(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert not cpu_fused.supports(torch.zeros(2, 8, dtype=torch.float16))
    assert not cpu_fused.supports(torch.zeros(8, 2).t())
    assert not cpu_fused.supports(torch.zeros(2, 2, 8))

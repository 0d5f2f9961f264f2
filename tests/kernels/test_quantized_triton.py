"""The quantized linear layers on the Triton dequantize-GEMM (the CUDA path, interpreted on CPU):
a layer's blocks reach `ops.linear_blocks` as 4-bit nibbles or int8 values with their scales,
offsets and act-order input order, and a symmetric GPTQ act-order model (whose offsets -8 d
are exact in fp16) served with attention_backend="triton" gives the tokens of its float copy
on the same kernels: the GEMM computes in the activations' dtype, so the weights are the only
possible difference, and there is none.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedserve_kernels import cpu_quant
from server import LLM, SamplingParams
from server.models.gguf import Q8Blocks
from server.models.layers.linear import MergedLinear
from server.models.layers.quantized_linear import Int8LinearMethod, is_quantized
from server.models.packed_int import PackedIntFormat
from tests.model_factory import make_tiny_model
from tests.packed_int_factory import dequantized, pack_gptq, quantize_groups, write_packed


def gptq_blocks(w: torch.Tensor, order: torch.Tensor):
    """An asymmetric GPTQ layer's blocks, and the weight the kernel holds: d * q + m with the
    offset m = -d * z in fp16 (the rounding models/packed_int.py describes)."""
    q, zeros, scales, g_idx = quantize_groups(w, 4, 32, sym=False, order=order)
    qweight, qzeros = pack_gptq(q, zeros, 4, v1=True)
    parts = {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": scales, "l.g_idx": g_idx}
    (_, blocks), = PackedIntFormat("gptq", 4, 32, 1).tensors(parts.items(), set(parts))
    held = (blocks.values.float().view(w.shape[0], -1, 32) * blocks.scales.float()[..., None]
            + blocks.mins().float()[..., None]).view(w.shape)
    weight = torch.empty_like(held)
    weight[:, blocks.perm] = held
    exact = dequantized(q, zeros, scales, g_idx)
    assert (weight - exact).abs().max() <= float(exact.abs().max()) * 2 ** -10
    return blocks, weight


@pytest.fixture
def launches(monkeypatch) -> list[bool]:
    """Whether each launch of the block GEMM took 4-bit nibbles."""
    module = importlib.import_module("pagedserve_kernels.quant_gemm")
    seen: list[bool] = []
    real = module.linear_blocks

    def spy(x, values, *args, **kwargs):
        seen.append(values.dtype == torch.uint8)
        return real(x, values, *args, **kwargs)

    monkeypatch.setattr(module, "linear_blocks", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_layer_of_4_bit_blocks_in_input_order(dtype, launches):
    torch.manual_seed(0)
    order = torch.randperm(64)
    merged = MergedLinear(64, [32, 16], bias=True, method=Int8LinearMethod(False, gemm="triton"),
                          dtype=dtype)
    expected = []
    for i, rows in enumerate((32, 16)):
        blocks, weight = gptq_blocks(torch.randn(rows, 64) * 0.1, order)
        merged.weight.weight_loader(merged.weight, blocks, i)
        expected.append(weight)
    bias = torch.randn(48).to(dtype)
    merged.bias.weight_loader(merged.bias, bias[:32], 0)
    merged.bias.weight_loader(merged.bias, bias[32:], 1)
    assert merged.blocks is not None and not is_quantized(merged) and merged.q8_perm is not None
    x = torch.randn(3, 64).to(dtype)
    want = x.float() @ torch.cat(expected).t() + bias.float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(merged(x).float(), want, rtol=tol, atol=tol)
    assert launches == [True]


def test_a_layer_of_q8_0_blocks(launches):
    torch.manual_seed(1)
    w = torch.randn(48, 96)
    layer = MergedLinear(96, [48], method=Int8LinearMethod(False, gemm="triton"))
    blocks = cpu_quant.quantize_q8_0(w)
    layer.weight.weight_loader(layer.weight, Q8Blocks(blocks, (48, 96)), 0)
    x = torch.randn(5, 96)
    want = x @ cpu_quant.dequantize("Q8_0", blocks).t()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert launches == [False]


def test_an_act_order_gptq_model_on_the_triton_kernels(tmp_path, launches):
    model = make_tiny_model(tmp_path / "llama", "llama", rope_scaling=None)
    packed, floats = write_packed(model, tmp_path, group_size=32, sym=True, act_order=True)
    prompts = [[5, 17, 300, 41], list(range(20, 37))]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    tokens = {}
    for path in (packed, floats):
        llm = LLM(str(path), attention_backend="triton", dtype="float32",
                  kv_cache_memory=1 << 22)
        tokens[path.name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens[packed.name] == tokens[floats.name]
    assert launches and all(launches)  # every projection on nibbles

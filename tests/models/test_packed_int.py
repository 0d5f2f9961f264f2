"""GPTQ and AWQ checkpoints (server/models/packed_int.py): the packed tensors a checkpoint holds
give back the weights they were made from (tests/packed_int_factory.py writes them in the
formats' own layouts), the served model runs its projections on the 8-bit GEMM's 4-bit (or
8-bit) tiles with the same tokens on every path, and with the GEMM off the layers hold exactly
the float copy's weights. A checkpoint this server cannot serve stops with a message naming
the field."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from server import LLM
from server.models.errors import ModelLoadError
from server.models.layers import quantized_linear
from server.models.layers.linear import MergedLinear
from server.models.layers.quantized_linear import Int8LinearMethod, is_quantized
from server.models.packed_int import IntBlocks, PackedIntFormat, read_format
from tests.model_factory import hf_greedy, make_tiny_model
from tests.models.conftest import random_prompts
from tests.models.quantized_paths import SMALL_CACHE, check_paths, run
from tests.packed_int_factory import (
    dequantized,
    pack_awq,
    pack_gptq,
    quantize_groups,
    write_packed,
)


def packed_parts(w, method, bits, group_size, sym=False, order=None, v1=True):
    """(PackedIntFormat, its tensors of one layer, the weight they stand for)."""
    q, zeros, scales, g_idx = quantize_groups(w, bits, group_size, sym, order)
    if method == "awq":
        qweight, qzeros = pack_awq(q, zeros)
        parts = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    else:
        qweight, qzeros = pack_gptq(q, zeros, bits, v1)
        parts = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    fmt = PackedIntFormat(method, bits, group_size, int(method == "gptq" and v1))
    return fmt, parts, dequantized(q, zeros, scales, g_idx)


@pytest.mark.parametrize("method,bits,group_size,sym,act_order,v1", [
    ("gptq", 4, 128, False, False, True), ("gptq", 4, 32, True, False, False),
    ("gptq", 4, 64, False, True, True), ("gptq", 8, -1, False, False, True),
    ("gptq", 8, 32, True, True, False), ("gptq", 2, 32, False, False, True),
    ("awq", 4, 128, False, False, False), ("awq", 4, 32, False, False, False)])
def test_the_blocks_hold_the_weights_the_tensors_stand_for(method, bits, group_size, sym,
                                                            act_order, v1):
    torch.manual_seed(bits + group_size)
    w = torch.randn(48, 256) * 0.05
    order = torch.randperm(256) if act_order else None
    fmt, parts, expected = packed_parts(w, method, bits, group_size, sym, order, v1)
    (name, blocks), = fmt.tensors(((f"layer.{k}", v) for k, v in parts.items()),
                                  {f"layer.{k}" for k in parts})
    assert name == "layer.weight" and isinstance(blocks, IntBlocks)
    assert blocks.shape == (48, 256) and (blocks.perm is not None) == act_order
    assert torch.equal(blocks.dequantize(), expected)
    assert (expected - w).abs().max() < 0.6 * float(parts["scales"].float().max())
    if bits <= 4:  # the values fit the GEMM's 4-bit tiles
        assert int(blocks.values.min()) >= 0 and int(blocks.values.max()) < 1 << bits
    ours = blocks.scales.float().repeat_interleave(32, 1) * blocks.values.float() + \
        blocks.mins().float().repeat_interleave(32, 1)  # the 8-bit GEMM's d * q + m
    permuted = expected if blocks.perm is None else expected[:, blocks.perm]
    torch.testing.assert_close(ours, permuted, rtol=0, atol=float(w.abs().max()) * 2 ** -10)


def test_groups_that_do_not_fall_on_blocks_of_32_are_dequantized(caplog):
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    fmt, parts, expected = packed_parts(w, "gptq", 4, 16, order=torch.randperm(64))
    with caplog.at_level(logging.WARNING):
        (_, weight), = fmt.tensors(((f"l.{k}", v) for k, v in parts.items()),
                                   {f"l.{k}" for k in parts})
    assert torch.equal(weight, expected)
    assert "1 layers' groups do not fall on blocks of 32" in caplog.text


def test_an_act_order_layer_gathers_its_inputs():
    torch.manual_seed(4)
    order = torch.randperm(96)
    shards = [torch.randn(n, 96) * 0.1 for n in (32, 16)]
    merged = MergedLinear(96, [32, 16], method=Int8LinearMethod(quantize_floats=False))
    expected = []
    for i, w in enumerate(shards):
        fmt, parts, weight = packed_parts(w, "gptq", 4, 32, order=order)
        (_, blocks), = fmt.tensors(((f"l.{k}", v) for k, v in parts.items()),
                                   {f"l.{k}" for k in parts})
        merged.weight.weight_loader(merged.weight, blocks, i)
        expected.append(weight)
    assert is_quantized(merged) and merged.q8_perm is not None
    x = torch.randn(5, 96)
    want = x @ torch.cat(expected).t()
    torch.testing.assert_close(merged(x), want, rtol=0, atol=0.02 * float(want.abs().max()))


def test_shards_in_different_input_orders_keep_a_float_layer(caplog):
    torch.manual_seed(5)
    merged = MergedLinear(64, [32, 32], method=Int8LinearMethod(quantize_floats=False))
    expected = []
    with caplog.at_level(logging.WARNING):
        for i in range(2):
            w = torch.randn(32, 64)
            fmt, parts, weight = packed_parts(w, "gptq", 4, 32, order=torch.randperm(64))
            (_, blocks), = fmt.tensors(((f"l.{k}", v) for k, v in parts.items()),
                                       {f"l.{k}" for k in parts})
            merged.weight.weight_loader(merged.weight, blocks, i)
            expected.append(weight)
    assert not is_quantized(merged) and torch.equal(merged.weight, torch.cat(expected))
    assert "take their inputs in different orders" in caplog.text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed-models")
    return {"llama": make_tiny_model(root / "llama", "llama", rope_scaling=None),
            "qwen2": make_tiny_model(root / "qwen2", "qwen2")}


@pytest.mark.parametrize("arch,settings", [
    ("llama", dict(method="gptq", group_size=32)),
    ("qwen2", dict(method="gptq", group_size=64, sym=True, checkpoint_format="gptq_v2")),
    ("llama", dict(method="gptq", group_size=32, act_order=True)),
    ("qwen2", dict(method="gptq", bits=8, group_size=-1)),
    ("llama", dict(method="awq", group_size=32))], ids=lambda v: v if isinstance(v, str) else
    "-".join(f"{k}={x}" for k, x in v.items()))
def test_a_packed_checkpoint_is_served_from_its_blocks(arch, settings, models, tmp_path,
                                                      monkeypatch):
    packed, floats = write_packed(models[arch], tmp_path, **settings)
    prompts = random_prompts(seed=31, count=3, min_len=3, max_len=30)
    act_order = settings.get("act_order", False)
    llm = check_paths(packed, prompts, monkeypatch, compiled=not act_order)
    runner = llm.engine.runner
    assert llm.engine.config.model.quantization == settings["method"]
    layers = [m for layer in runner.model.model.layers
              for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(is_quantized(m) and (m.q8_perm is not None) == act_order for m in layers)
    assert all(quantized_linear.cpu_quant.is_four_bit(m.q8) == (settings.get("bits", 4) == 4)
               for m in layers)
    with monkeypatch.context() as m:  # the GEMM off: the layers hold the float copy's weights
        m.setattr(quantized_linear, "kernel_runs", lambda *args: False)
        assert run(packed, prompts)[1] == run(floats, prompts)[1]


def test_a_gptq_checkpoint_computes_in_fp32_on_cpu(models, tmp_path):
    """It is saved in fp16 (config torch_dtype); "auto" takes fp32 on CPU, where the compiled
    step runs; the float copy agrees with transformers."""
    packed, floats = write_packed(models["llama"], tmp_path, group_size=32, sym=True)
    llm = LLM(str(packed), kv_cache_memory=SMALL_CACHE)
    assert llm.engine.runner.dtype == torch.float32
    assert llm.engine.runner.compiled_step is not None
    prompt = random_prompts(seed=32, count=1, min_len=8, max_len=9)[0]
    float_llm = LLM(str(floats), kv_cache_memory=SMALL_CACHE)
    from tests.models.quantized_paths import GREEDY
    out = float_llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert out == hf_greedy(floats, prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported; supported: gptq, awq"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3 is not supported for gptq"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits 8 is not supported for awq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size 0 is not a group size"),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "version": "gemv"},
     "version 'gemv' (AWQ packing) is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
     "zero_point false"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*down": {}}},
     "quantization_config.dynamic"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin' is not supported"),
])
def test_a_quantization_config_this_server_cannot_serve_names_its_field(config, message):
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        read_format({"quantization_config": config})


def test_unservable_checkpoints_stop_start_up(models, tmp_path):
    packed, _ = write_packed(models["llama"], tmp_path)
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method 'bitsandbytes' is not supported"):
        LLM(str(packed), kv_cache_memory=SMALL_CACHE)
    with pytest.raises(ModelLoadError, match="quantization 'gptq' takes a GPTQ checkpoint"):
        LLM(str(models["llama"]), kv_cache_memory=SMALL_CACHE, quantization="gptq")
    with pytest.raises(ModelLoadError, match="the gptq layer .* lacks scales"):
        fmt = PackedIntFormat("gptq", 4, 32, 1)
        list(fmt.tensors([], {"l.qweight", "l.qzeros"}))

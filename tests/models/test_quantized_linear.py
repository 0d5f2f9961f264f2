"""8-bit linear layers (server/models/layers/quantized_linear.py): a GGUF file's Q8_0 blocks
stay blocks, `quantization="int8"` makes them from a float checkpoint, and the served greedy
tokens equal those of the same model with the 8-bit GEMM replaced by its torch reference
(kernels/reference.py `linear_q8_0`), so the shards, the q/k row order and the biases reach the
kernel intact. A layer whose shards differ in type, or whose inputs are no multiple of 32,
keeps a float weight."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedserve_kernels import cpu_quant, reference
from server import LLM
from server.models.gguf import Q8Blocks
from server.models.layers.linear import Linear, MergedLinear
from server.models.layers.quantized_linear import Int8LinearMethod, is_quantized
from tests.gguf_factory import write_gguf
from tests.model_factory import make_tiny_model
from tests.models.conftest import random_prompts
from tests.models.quantized_paths import SMALL_CACHE, check_paths, projections


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("q8-models")
    return {"llama": make_tiny_model(root / "llama", "llama", rope_scaling=None),
            "qwen2": make_tiny_model(root / "qwen2", "qwen2"),
            "llama-256": make_tiny_model(root / "llama-256", "llama", rope_scaling=None,
                                         hidden_size=256, intermediate_size=512)}


@pytest.mark.parametrize("arch,kind", [("llama", "Q8_0"), ("qwen2", "Q8_0"), ("qwen2", "Q4_0"),
                                       ("llama", "Q4_1"), ("qwen2", "Q5_0"), ("llama", "Q5_1"),
                                       ("llama-256", "Q4_K"),
                                       ("llama-256", "Q5_K"), ("llama-256", "Q6_K")])
def test_gguf_blocks_are_served_8_bit(arch, kind, models, tmp_path, monkeypatch):
    path = write_gguf(models[arch], tmp_path / f"{arch}.gguf", kind)
    prompts = random_prompts(seed=21, count=3, min_len=3, max_len=30)
    llm = check_paths(path, prompts, monkeypatch)
    assert llm.engine.config.model.quantization == "gguf"
    assert all(is_quantized(m) for m in projections(llm))  # q/k/v, o, gate/up, down, the head
    assert llm.engine.runner.model.model.embed_tokens.q8_blocks is None  # tiles, or unused
    four_bit = kind in ("Q4_0", "Q4_1", "Q4_K")  # nibbles in the tiles
    assert all(cpu_quant.is_four_bit(m.q8) == four_bit for m in projections(llm))


def test_a_tied_head_takes_the_embeddings_blocks(models, tmp_path, monkeypatch):
    path = write_gguf(models["qwen2"], tmp_path / "tied.gguf", "Q8_0")  # tied embeddings
    llm = check_paths(path, random_prompts(seed=24, count=2, min_len=3, max_len=20),
                      monkeypatch)
    head = llm.engine.runner.model.lm_head
    assert head.proj is None and head.q8 is not None and head.packed is None
    assert llm.engine.runner.model.model.embed_tokens.q8_blocks is None  # in the tiles now


def test_int8_quantizes_a_float_checkpoint(models, monkeypatch):
    prompts = random_prompts(seed=22, count=3, min_len=3, max_len=30)
    llm = check_paths(models["qwen2"], prompts, monkeypatch, quantization="int8")
    assert llm.engine.config.model.quantization == "int8"
    layers = projections(llm)
    assert layers and all(is_quantized(m) and m.weight.numel() == 0 for m in layers)
    assert llm.engine.runner.model.lm_head.q8 is not None  # tied: quantized too


def test_shards_of_block_types_merge_and_a_float_shard_keeps_a_float_layer(
        models, tmp_path, monkeypatch, caplog):
    """Q4_K_M-like mixes: q and k Q4_1 with v Q8_0 make one block matrix (its tiles carry a
    scale and an offset per block); an F16 shard beside blocks makes the layer float."""
    path = write_gguf(models["llama"], tmp_path / "mixed.gguf", "Q4_1",
                      {"blk.1.attn_v.weight": "Q8_0", "blk.0.attn_v.weight": "F16"})
    prompts = random_prompts(seed=23, count=2, min_len=3, max_len=20)
    with caplog.at_level(logging.WARNING):
        llm = check_paths(path, prompts, monkeypatch)
    layers = llm.engine.runner.model.model.layers
    qkv0 = layers[0].self_attn.qkv_proj
    assert not is_quantized(qkv0) and qkv0.weight.shape == (qkv0.output_size, qkv0.input_size)
    assert "some of its shards are float tensors" in caplog.text
    assert is_quantized(layers[1].self_attn.qkv_proj)
    assert sum(not is_quantized(m) for m in projections(llm)) == 1


def test_a_q4_k_m_like_mix_is_served_8_bit(models, tmp_path, monkeypatch, caplog):
    """Q4_K with some tensors at Q6_K (requantized, logged) and the embedding at Q8_0: every
    projection and the tied head in blocks, Q4_K and Q6_K shards merged in one layer."""
    types = {"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K",
             "token_embd.weight": "Q8_0"}
    path = write_gguf(models["llama-256"], tmp_path / "mix.gguf", "Q4_K", types)
    with caplog.at_level(logging.INFO, logger="server.models.gguf"):
        llm = check_paths(path, random_prompts(seed=25, count=2, min_len=3, max_len=20),
                          monkeypatch)
    assert all(is_quantized(m) for m in projections(llm))
    assert "Q6_K (2 tensors): requantized" in caplog.text
    assert "no kernel here" not in caplog.text


def test_the_gguf_format_needs_a_gguf_file(models):
    with pytest.raises(Exception, match="quantization 'gguf' takes a GGUF file"):
        LLM(str(models["llama"]), kv_cache_memory=SMALL_CACHE, quantization="gguf")


def test_a_layer_the_kernel_cannot_take_stays_float():
    torch.manual_seed(0)
    method = Int8LinearMethod(quantize_floats=True)
    odd = Linear(40, 16, method=method)  # inputs no multiple of 32
    w = torch.randn(16, 40)
    odd.weight.weight_loader(odd.weight, w, None)
    assert not is_quantized(odd) and torch.equal(odd.weight, w)
    merged = MergedLinear(64, [16, 8], method=Int8LinearMethod(quantize_floats=False))
    a, b = torch.randn(16, 64), torch.randn(8, 64)
    merged.weight.weight_loader(merged.weight, Q8Blocks(cpu_quant.quantize_q8_0(a), (16, 64)), 0)
    assert merged.weight.numel() == 0  # waits for its last shard
    merged.weight.weight_loader(merged.weight, Q8Blocks(cpu_quant.quantize_q8_0(b), (8, 64)), 1)
    assert is_quantized(merged)
    x = torch.randn(3, 64)
    blocks = cpu_quant.quantize_q8_0(torch.cat([a, b]))
    torch.testing.assert_close(merged(x), reference.linear_q8_0(
        x, *cpu_quant.split_q8_0(blocks)), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="the config implies"):
        merged.weight.weight_loader(merged.weight, torch.zeros(9, 64), 1)

"""model_runner/cpu.py decides the kernels from the config alone (no environment variables), and
the engine's frozen config holds the values start-up resolved, logged once."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedserve_kernels import cpu_attention, cpu_fused
from server.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, ModelConfig
from server.model_runner.cpu import KernelChoice, choose_kernels

CPU = torch.device("cpu")


def test_torch_backend_runs_no_compiled_kernel():
    assert choose_kernels(ModelConfig(attention_backend="torch"), CPU, torch.float32) == \
        KernelChoice("torch", "torch", native=False)


def test_auto_on_cpu_takes_what_builds():
    choice = choose_kernels(ModelConfig(), CPU, torch.float32)
    assert choice.native
    assert choice.attention_backend == ("cpu" if cpu_attention.available() else "torch")
    assert choice.fused_ops == cpu_fused.available()


def test_fused_ops_take_fp32_and_bf16():
    assert choose_kernels(ModelConfig(), CPU, torch.bfloat16).fused_ops == cpu_fused.available()
    assert not choose_kernels(ModelConfig(), CPU, torch.float16).fused_ops


def test_cuda_takes_triton_and_no_cpu_path():
    assert choose_kernels(ModelConfig(), torch.device("cuda"), torch.float16) == \
        KernelChoice("triton", "torch", native=False)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_the_engine_config_holds_the_effective_values(backend, caplog):
    from server import LLM

    with caplog.at_level(logging.INFO, logger="server.engine.core"):
        engine = LLM(kv_cache_memory=1 << 24, attention_backend=backend).engine
    config = engine.config
    assert config.scheduler.max_num_batched_tokens == DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"]
    assert config.cache.num_blocks == engine.kv_cache.num_blocks == engine.runner.num_blocks
    assert config.cache.kv_cache_memory == engine.runner.num_blocks * engine.runner.bytes_per_block
    assert config.model.device == "cpu" and config.model.dtype == "float32"
    assert config.model.max_model_len == engine.max_model_len
    assert config.model.attention_backend == engine.runner.kernels.attention_backend
    assert config.model.compiled_decode == (engine.runner.compiled_step is not None)
    if backend == "torch":
        assert config.model.attention_backend == "torch" and not config.model.compiled_decode
    lines = [r.getMessage() for r in caplog.records if "engine config in effect" in r.getMessage()]
    assert len(lines) == 1 and f"num_blocks={engine.runner.num_blocks}" in lines[0]


def test_num_blocks_overrides_the_memory_budget():
    from server import LLM

    engine = LLM(kv_cache_memory=1 << 24, num_blocks=40).engine
    assert engine.kv_cache.num_blocks == 40 == engine.config.cache.num_blocks

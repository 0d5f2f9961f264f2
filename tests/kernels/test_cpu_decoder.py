"""kernels.cpu_decoder (kernels/csrc/decoder_cpu.cpp), run as the model runner's compiled decode
step (server/model_runner/cpu.py) over a model's export_decoder, against the model's own
layer-by-layer forward, for Llama, Qwen2 (qkv bias), Qwen3 (q/k norm) and Mistral (sliding
window) shapes, GQA and head sizes with and without a compiled-in size, in fp32 and in bf16
(where the layers and the step round at the same points and run the same GEMM tiles: the same
bits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedserve_kernels import cpu_decoder, ops
from server.config import ModelConfig
from server.model_runner.cpu import (
    COMPILED_DECODE_ROWS,
    CompiledDecodeStep,
    KernelChoice,
    compiled_decode_step,
)
from server.models.attention_metadata import AttentionMetadata
from server.models.base import CausalLM, ModelOptions
from server.models.layers.linear import Linear, pack_linear_weights
from server.models.layers.packed_gemm import GemmPolicy
from server.models.registry import parse_arch_config, resolve_model_class
from tests.kernels.test_cpu_attention import needs_compiler

pytestmark = needs_compiler

BLOCK_SIZE, NUM_BLOCKS = 4, 160
CPU = KernelChoice("cpu", "cpu", native=True)


def make_model(arch: str = "LlamaForCausalLM", head_dim: int = 16, heads: int = 4,
               kv_heads: int = 2, layers: int = 2, sliding_window: int | None = None,
               seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 48,
               intermediate: int = 40) -> CausalLM:
    raw = {"architectures": [arch], "vocab_size": 50, "hidden_size": hidden,
           "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 256}
    if sliding_window is not None:
        raw["sliding_window"] = sliding_window
    torch.manual_seed(seed)
    model = resolve_model_class(arch)(parse_arch_config(raw), ModelOptions(
        max_position=256, dtype=dtype, kernel_backend="cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    assert pack_linear_weights(model, policy=GemmPolicy(own=True)) > 0
    return model


def make_step(model: CausalLM, seq_lens: list[int], seed: int = 1, backend: str = "cpu"):
    """A decode-only batch over shuffled cache blocks, and caches filled with noise."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    dtype = model.model.norm.weight.dtype
    caches = [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
              for _ in range(cfg.num_layers)]
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    blocks = torch.randperm(NUM_BLOCKS, generator=g)
    table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        count = -(-n // BLOCK_SIZE)
        table[i, :count] = blocks[used:used + count].to(torch.int32)
        used += count
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    positions = lens.long() - 1
    slots = (table[torch.arange(len(seq_lens)), positions // BLOCK_SIZE].long() * BLOCK_SIZE
             + positions % BLOCK_SIZE)
    query_start_loc = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    md = AttentionMetadata(query_start_loc, lens, table, slots, backend,
                           ops.attention_plan(table, lens, query_start_loc, BLOCK_SIZE,
                                                  cfg.sliding_window, backend=backend))
    input_ids = torch.randint(0, cfg.vocab_size, (len(seq_lens),), generator=g)
    return input_ids, positions, caches, md


def compiled_for(model: CausalLM, caches) -> CompiledDecodeStep:
    step, reason = compiled_decode_step(model, ModelConfig(attention_backend="cpu"), CPU, caches)
    assert step is not None, reason
    return step


def both_paths(model, input_ids, positions, caches, md):
    """(hidden, caches) from the layer-by-layer forward and from the compiled step."""
    results = []
    for compiled in (False, True):
        own = [(k.clone(), v.clone()) for k, v in caches]
        with torch.inference_mode():
            hidden = (compiled_for(model, own)(input_ids, positions, md) if compiled
                      else model(input_ids, positions, own, md))
        results.append((hidden, own))
    return results


def assert_same(results):
    (expected, expected_caches), (got, got_caches) = results
    if expected.dtype == torch.bfloat16:
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
        assert all(torch.equal(gk, ek) and torch.equal(gv, ev)
                   for (ek, ev), (gk, gv) in zip(expected_caches, got_caches))
        return
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (ek, ev), (gk, gv) in zip(expected_caches, got_caches):
        torch.testing.assert_close(gk, ek, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gv, ev, rtol=1e-5, atol=1e-5)


def test_kernel_builds():
    assert cpu_decoder.available()


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("seq_lens", [[1], [9], [5, 17, 2], [3, 30, 8, 1, 12, 4, 21, 16],
                                      [(7 * i) % 23 + 1 for i in range(40)]])
def test_matches_the_layer_by_layer_forward(arch, seq_lens, dtype):
    """1-3 rows: attention per (row, kv head); 8 and 40: per row; 40 rows: GEMM row passes."""
    model = make_model(arch, dtype=dtype)
    assert_same(both_paths(model, *make_step(model, seq_lens)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 2, 1), (24, 3, 3), (128, 2, 2)])
def test_head_sizes(head_dim, heads, kv_heads, dtype):
    model = make_model(head_dim=head_dim, heads=heads, kv_heads=kv_heads, layers=1, dtype=dtype)
    assert_same(both_paths(model, *make_step(model, [7, 19])))


def test_the_step_matches_the_layers_on_either_side_of_each_amx_threshold():
    """bf16 with every GEMM's inputs a multiple of 32, so that AMX (where the CPU has it) and
    the vector tiles both run inside the step, each projection switching at the rows its table
    says: the layers' bits at 1-8 rows on either side of each threshold. (Both tiles sum in
    fp32 and round once, so the bits do not tell which of them ran.)"""
    model = make_model(dtype=torch.bfloat16, hidden=64, intermediate=64, head_dim=16, heads=4)
    linears = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.num_layers
    for module, threshold in zip(linears, [1, 1 << 30, 3, 6] * model.config.num_layers):
        table = dataclasses.replace(module.packed.table, amx_min_rows=threshold)
        module.packed = dataclasses.replace(module.packed, table=table)
    for rows in (1, 2, 3, 5, 6, 8):
        assert_same(both_paths(model, *make_step(model, [9 + i for i in range(rows)])))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(dtype):
    model = make_model("MistralForCausalLM", sliding_window=6, dtype=dtype)
    assert model.config.sliding_window == 6
    assert_same(both_paths(model, *make_step(model, [3, 6, 7, 25])))


def test_the_step_applies_only_to_few_decodes_on_the_native_path(monkeypatch):
    model = make_model()
    *_, caches, md = make_step(model, [5] * COMPILED_DECODE_ROWS)
    step = compiled_for(model, caches)
    assert step.max_rows == COMPILED_DECODE_ROWS  # the tests fix the measured limit at 64
    assert step.applies(COMPILED_DECODE_ROWS, md)
    assert not step.applies(COMPILED_DECODE_ROWS + 1,
                            make_step(model, [5] * (COMPILED_DECODE_ROWS + 1))[3])
    assert not step.applies(2, make_step(model, [5, 3], backend="torch")[3])
    # Where the compiled GEMM measured faster only up to 8 rows, so does the step.
    from server.models.layers import packed_gemm

    monkeypatch.setenv("PAGEDSERVE_SMALL_GEMM_ROWS", "8")
    packed_gemm.gemm_table.cache_clear()
    try:
        limited = compiled_for(make_model(), caches)
        assert limited.max_rows == 8 and limited.applies(8, make_step(model, [5] * 8)[3])
        assert not limited.applies(9, make_step(model, [5] * 9)[3])
    finally:
        packed_gemm.gemm_table.cache_clear()


def test_out_of_range_blocks_raise_and_write_nothing():
    model = make_model()
    input_ids, positions, caches, md = make_step(model, [5, 9])
    step = compiled_for(model, caches)
    before = [(k.clone(), v.clone()) for k, v in caches]
    bad = md.block_table.clone()
    bad[1, 2] = NUM_BLOCKS
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the KV cache"):
        step(input_ids, positions, dataclasses.replace(md, block_table=bad))
    shifted = dataclasses.replace(md, block_table=bad.clamp(max=NUM_BLOCKS - 1),
                                  slot_mapping=md.slot_mapping + NUM_BLOCKS * BLOCK_SIZE)
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the KV cache"):
        step(input_ids, positions, shifted)
    for (k, v), (bk, bv) in zip(caches, before):
        assert torch.equal(k, bk) and torch.equal(v, bv)


def test_needs_every_projection_on_the_own_gemm():
    model = make_model()
    model.model.layers[1].mlp.down_proj.packed = None
    step, reason = compiled_decode_step(model, ModelConfig(), CPU, make_step(model, [3])[2])
    assert step is None and "compiled GEMM" in reason


def test_a_family_without_the_export_hook_runs_layer_by_layer():
    model = make_model()
    model.export_decoder = lambda: None  # as a family without the hook
    step, reason = compiled_decode_step(model, ModelConfig(), CPU, make_step(model, [3])[2])
    assert step is None and "layer by layer" in reason


@pytest.mark.parametrize("compiled", [True, False])
def test_the_engine_runs_decodes_through_the_step_as_configured(tmp_path, monkeypatch,
                                                                 compiled):
    from server import LLM, SamplingParams
    from tests.model_factory import make_tiny_model

    llm = LLM(str(make_tiny_model(tmp_path, "llama")), dtype="float32", device="cpu",
              kv_cache_memory=1 << 22, compiled_decode=compiled)
    assert (llm.engine.runner.compiled_step is not None) == compiled
    assert llm.engine.config.model.compiled_decode == compiled
    calls = []
    real = cpu_decoder.decode_step
    monkeypatch.setattr(cpu_decoder, "decode_step",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    llm.generate([{"prompt_token_ids": [5, 9, 13]}],
                 SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(calls) == (3 if compiled else 0)  # every decode step after the prefill


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("seq_lens", [[1], [5, 17, 2], [(7 * i) % 23 + 1 for i in range(40)]])
def test_8_bit_projections_match_the_layer_by_layer_forward(arch, seq_lens):
    """fp32 with every projection in 8-bit tiles (Int8LinearMethod): the step quantizes each
    projection's input rows as kernels.cpu_quant does, so both paths run the same sums."""
    from server.models.layers.quantized_linear import Int8LinearMethod, is_quantized
    from server.models.layers.weights import shard_ids_of

    source = make_model(arch, hidden=64, intermediate=64)
    model = resolve_model_class(arch)(source.config, ModelOptions(
        max_position=256, dtype=torch.float32, kernel_backend="cpu",
        linear_method=Int8LinearMethod(quantize_floats=True)))
    weights = dict(source.named_parameters())
    sizes = {name: m.output_sizes for name, m in model.named_modules() if isinstance(m, Linear)}
    for name, p in model.named_parameters():
        for shard in shard_ids_of(p):
            tensor = weights[name]
            if shard is not None:
                layer_sizes = sizes[name.rsplit(".", 1)[0]]
                tensor = tensor.narrow(0, sum(layer_sizes[:shard]), layer_sizes[shard])
            p.weight_loader(p, tensor.detach().clone(), shard)
    pack_linear_weights(model, policy=GemmPolicy(own=True))
    assert all(is_quantized(m) for m in model.modules() if isinstance(m, Linear))
    assert_same(both_paths(model, *make_step(model, seq_lens)))

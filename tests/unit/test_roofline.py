"""`pagedserve bench roofline`: the FLOP / byte counts on hand-checked configs, the ceilings'
arithmetic, and a quick run of the command on a tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from server.bench import roofline as rl
from server.models.arch_config import ArchConfig
from server.models.errors import ModelLoadError
from server.models.registry import parse_arch_config

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512,
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, dtype="float32")
SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
               hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
# H 8, I 16, 1 layer, 2 heads / 1 KV head of 4, vocab 10, untied:
# qkv 16x8=128, o 8x8=64, gate_up 32x8=256, down 8x16=128 -> 576 matmul; lm_head 10x8=80
SMALL = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4,
             tie_word_embeddings=False)


def arch(raw: dict, name: str = "LlamaForCausalLM", **extra) -> ArchConfig:
    return parse_arch_config({"architectures": [name], **raw, **extra})


def test_tiny_counts_by_hand():
    # per layer: qkv (64+2*32) x 64 = 8192, o 64x64 = 4096, gate_up 256x64 = 16384,
    # down 64x128 = 8192 -> 36864; 2 layers -> 73728; lm_head = embedding 512x64 = 32768
    c = rl.count_workload(arch(TINY), input_len=128, output_len=128, bytes_per_param=4)
    assert c.layer_matmul_params == 73728 and c.lm_head_params == 32768
    # + 2 RMSNorms of 64 per layer + final norm 64; the tied table counted once
    assert c.num_params == 73728 + 2 * 128 + 64 + 32768 == 106_816
    assert c.weight_bytes_per_step == 4 * 106_816
    assert c.attention_flops_per_key == 4 * 2 * 64
    assert c.mean_prompt_context == 64.5  # (128 + 1) / 2
    assert c.mean_output_context == 192.5  # 128 + (128 + 1) / 2
    assert c.flops_per_prompt_token == 2 * 73728 + 512 * 64.5 == 180_480
    assert c.flops_per_output_token == 2 * (73728 + 32768) + 512 * 192.5 == 311_552
    assert c.kv_bytes_per_step == 2 * 2 * 32 * 192.5 * 4
    shapes = {g.name: (g.out_features, g.in_features, g.count) for g in rl.gemm_shapes(arch(TINY))}
    assert shapes == {"qkv": (128, 64, 2), "o_proj": (64, 64, 2), "gate_up": (256, 64, 2),
                      "down": (64, 128, 2), "lm_head": (512, 64, 1)}


def test_smollm2_counts():
    c = rl.count_workload(arch(SMOLLM2), 128, 128, 4)
    assert c.num_params == 134_515_008  # SmolLM2-135M's published count
    assert c.weight_bytes_per_step == 538_060_032  # issue 5: "0.54 GB of weights per step"
    assert c.layer_matmul_params == 30 * (576 * 960 + 576 * 576 + 3072 * 576 + 576 * 1536)
    assert c.flops_per_prompt_token == 2 * 106_168_320 + 4 * 30 * 576 * 64.5 == 216_794_880
    assert c.flops_per_output_token == 2 * 134_479_872 + 4 * 30 * 576 * 192.5 == 282_265_344


@pytest.mark.parametrize("name,extra,read", [
    ("LlamaForCausalLM", {}, 576 + 16 + 8 + 80),
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}, 680 + 16 + 8 + 40),
    ("Qwen2ForCausalLM", {}, 680 + 16),  # q, k, v biases only
    ("Qwen3ForCausalLM", {}, 680 + 8),  # q_norm and k_norm of head_dim
    ("MistralForCausalLM", {"sliding_window": 3}, 680),
])
def test_counts_across_architectures_match_transformers(name, extra, read):
    import transformers

    a = arch(SMALL, name, **extra)
    c = rl.count_workload(a, 4, 2, 2)
    assert c.layer_matmul_params == 576 and c.lm_head_params == 80
    assert c.weight_bytes_per_step == 2 * read
    assert c.num_params == read + 80  # untied: the embedding table is not read per step
    config_cls = getattr(transformers, name.replace("ForCausalLM", "Config"))
    config = config_cls(**SMALL, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert c.num_params == sum(p.numel() for p in model.parameters())


def test_sliding_window_caps_the_attention_context():
    a = arch(SMALL, "MistralForCausalLM", sliding_window=3)
    c = rl.count_workload(a, input_len=4, output_len=2, bytes_per_param=4)
    assert c.mean_prompt_context == (1 + 2 + 3 + 3) / 4
    assert c.mean_output_context == 3.0
    assert c.flops_per_prompt_token == 2 * 576 + 4 * 1 * 8 * 2.25
    for first, last, window in [(1, 9, None), (1, 9, 4), (3, 7, 5), (6, 9, 5), (5, 5, 5),
                                (129, 256, 200)]:
        brute = sum(min(c, window or c) for c in range(first, last + 1)) / (last - first + 1)
        assert rl.mean_context(first, last, window) == pytest.approx(brute)


def test_ceilings_arithmetic():
    c = rl.count_workload(arch(TINY), 128, 128, 4)
    assert rl.decode_ceiling(c, bandwidth=427_264e3) == pytest.approx(1000.0)
    # 311552 + 180480 x 128/128 = 492032 FLOPs per output token
    assert rl.throughput_ceiling(c, 492_032e3, 128, 128) == pytest.approx(1000.0)
    c = rl.count_workload(arch(TINY), 256, 64, 4)
    # prompt: 147456 + 512 x 128.5 = 213248; output: 212992 + 512 x 288.5 = 360704
    assert (c.flops_per_prompt_token, c.flops_per_output_token) == (213_248, 360_704)
    assert rl.throughput_ceiling(c, 1e9, 256, 64) == pytest.approx(
        1e9 / (360_704 + 213_248 * 4))
    with pytest.raises(ValueError):
        rl.count_workload(arch(TINY), 0, 128, 4)


def test_best_seconds_keeps_the_fastest_and_times_enough():
    durations = iter([0.5, 0.03, 0.01, 0.02] + [0.0] * 200)
    calls = []
    clock = [0.0]

    def fake_perf_counter() -> float:
        return clock[0]

    def fn() -> None:
        calls.append(1)
        clock[0] += next(durations)

    original = rl.time.perf_counter
    rl.time.perf_counter = fake_perf_counter
    try:
        assert rl.best_seconds(fn, iters=3, warmup=1) == pytest.approx(0.01)
        assert len(calls) == 4  # 1 warm-up (the 0.5 s one) + 3 timed
        calls.clear()
        durations = iter([0.1] * 200)
        assert rl.best_seconds(fn, iters=2, warmup=0, min_seconds=0.55) == pytest.approx(0.1)
        assert len(calls) == 6  # until 0.6 s >= 0.55 s had been timed
    finally:
        rl.time.perf_counter = original


def test_best_seconds_each_keeps_each_calls_fastest(monkeypatch):
    # pass 1: a 0.4, b 0.1; pass 2: a 0.1, b 0.3 -> per call 0.1 and 0.1 (a whole pass: 0.4)
    durations = iter([0.4, 0.1, 0.1, 0.3])
    clock = [0.0]
    monkeypatch.setattr(rl.time, "perf_counter", lambda: clock[0])

    def call() -> None:
        clock[0] += next(durations)

    assert rl.best_seconds_each([call, call], iters=2, warmup=0) == pytest.approx([0.1, 0.1])


def test_rounds_keep_each_calls_best():
    assert rl._merge_min(None, {"a": [2.0, 1.0]}) == {"a": [2.0, 1.0]}
    assert rl._merge_min({"a": [2.0, 1.0]}, {"a": [1.5, 3.0]}) == {"a": [1.5, 1.0]}
    gemms = [rl.Gemm("x", 2, 3, 2), rl.Gemm("y", 1, 1, 1)]
    row = rl.gemm_row(gemms, 4, {"x": [0.5, 0.5], "y": [1.0]}, bytes_per_param=4)
    # x: 2 x 4 x 12 = 96 FLOPs in 1 s; y: 8 FLOPs in 1 s; weights 13 x 4 bytes in 2 s
    assert row.gflops_per_s == pytest.approx({"x": 96e-9, "y": 8e-9})
    assert row.all_gflops_per_s == pytest.approx(52e-9)
    assert row.forward_ms == pytest.approx(2000.0)
    assert row.weight_gb_per_s == pytest.approx(26e-9)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    return rl.main(parser.parse_args(argv))


def test_main_on_a_tiny_model(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    threads_before = torch.get_num_threads()
    out_json = tmp_path / "roofline.json"
    assert _run(["--model", str(tmp_path), "--input-len", "16", "--output-len", "8",
                 "--threads", "1", "--batch-tokens", "1,4", "--square-sizes", "32,64",
                 "--bandwidth-mib", "1", "--iters", "1", "--warmup", "0", "--min-time", "0",
                 "--rounds", "2",
                 "--json", str(out_json)]) == 0
    assert torch.get_num_threads() == threads_before
    printed = capsys.readouterr().out
    assert "ceilings:" in printed and "decode at concurrency 1" in printed
    result = json.loads(out_json.read_text())
    assert result["threads"] == 1 and result["dtype"] == "float32"
    assert [r["num_tokens"] for r in result["gemms"]] == [1, 4]
    assert set(result["gemms"][0]["gflops_per_s"]) == {"qkv", "o_proj", "gate_up", "down",
                                                       "lm_head"}
    assert set(result["square_gflops_per_s"]) == {"32", "64"}
    counts = result["counts"]
    assert counts["num_params"] == 106_816
    assert counts["flops_per_prompt_token"] == 2 * 73728 + 512 * 8.5
    ceilings = result["ceilings"]
    assert result["bandwidth_gb_per_s"] > 0
    assert ceilings["decode_tok_s_concurrency_1"] == pytest.approx(
        result["bandwidth_gb_per_s"] * 1e9 / counts["weight_bytes_per_step"])
    # Each GEMM kind the server may choose, at every M; "best" takes each shape's fastest.
    libraries = result["library_gflops_per_s"]
    assert set(libraries) == {"1", "4"}
    for row in libraries.values():
        assert "torch" in row and all(v > 0 for v in row.values())
        assert row["best"] >= max(v for k, v in row.items() if k != "best") * (1 - 1e-9)
    assert "GEMM kinds at the model's shapes" in printed
    best_library = max(r["best"] for r in libraries.values())
    assert ceilings["best_library_gflops_per_s"] == pytest.approx(best_library)
    best_gemm = max([*result["square_gflops_per_s"].values(),
                     *(r["all_gflops_per_s"] for r in result["gemms"]), best_library])
    assert ceilings["best_gemm_gflops_per_s"] == pytest.approx(best_gemm)
    # The FLOP ceiling is the FMA loop's where it builds, else the best GEMM's; the bf16 loop
    # runs for bf16 models only.
    peak = ceilings["fma_peak_gflops_per_s"] or best_gemm
    assert ceilings["peak_gflops_per_s"] == pytest.approx(peak)
    assert ceilings["bf16_dot_peak_gflops_per_s"] is None
    assert "fp32 FMA peak" in printed and "bf16 dot-product peak" not in printed
    per_output = counts["flops_per_output_token"] + counts["flops_per_prompt_token"] * 16 / 8
    assert ceilings["output_tok_s_large_concurrency"] == pytest.approx(peak * 1e9 / per_output)
    assert ceilings["output_tok_s_large_concurrency_at_best_gemm"] == pytest.approx(
        best_gemm * 1e9 / per_output)
    best_row = max(result["gemms"], key=lambda r: r["all_gflops_per_s"])
    assert ceilings["model_gemm_tokens"] == best_row["num_tokens"]
    assert ceilings["output_tok_s_large_concurrency_at_model_gemms"] == pytest.approx(
        best_row["all_gflops_per_s"] * 1e9 / per_output)
    assert ceilings["decode_tok_s_concurrency_1_from_m1_gemms"] == pytest.approx(
        1e3 / result["gemms"][0]["forward_ms"])


def test_a_bf16_model_is_held_to_the_bf16_dot_product_peak(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out_json = tmp_path / "roofline.json"
    assert _run(["--model", str(tmp_path), "--dtype", "bfloat16", "--threads", "1",
                 "--batch-tokens", "1", "--square-sizes", "32", "--bandwidth-mib", "1",
                 "--iters", "1", "--warmup", "0", "--min-time", "0",
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    ceilings = json.loads(out_json.read_text())["ceilings"]
    dot = ceilings["bf16_dot_peak_gflops_per_s"]
    assert "bf16 dot-product peak" in printed
    if dot is None:  # no AVX512_BF16 here: bf16 is widened and runs on the FMA units
        assert "not measured (no AVX512_BF16)" in printed
        assert ceilings["peak_kind"] != "bf16 dot peak"
    else:
        assert dot > 0 and ceilings["peak_kind"] == "bf16 dot peak"
        assert ceilings["peak_gflops_per_s"] == pytest.approx(dot)
        assert "(bf16 dot peak)" in printed


def test_main_refuses_bad_input(tmp_path: Path):
    with pytest.raises(ModelLoadError):
        _run(["--model", str(tmp_path)])  # no config.json
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="threads"):
        _run(["--model", str(tmp_path), "--threads", "0"])
    with pytest.raises(ValueError, match="rounds"):
        _run(["--model", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit):
        _run(["--model", str(tmp_path), "--batch-tokens", "1,x"])

"""`pagedserve bench profile` on the bundled model: phases that add up, ops, and an engine left
as it was found (the phase timers are removed again)."""

from __future__ import annotations

import json

import pytest

from server.bench import profile_step
from server.cli import build_parser


def test_profile_reports_phases_and_ops(tmp_path, capsys):
    out = tmp_path / "profile.json"
    args = build_parser().parse_args([
        "bench", "profile", "--batch-size", "3", "--input-len", "20", "--steps", "2",
        "--warmup-steps", "1", "--top", "5", "--kv-cache-memory", str(1 << 24),
        "--json", str(out)])
    assert args.func(args) == 0
    summary = json.loads(out.read_text())
    assert summary["batch_size"] == 3 and summary["steps"] == 2
    phases = summary["phases_ms"]
    assert set(phases) == set(profile_step.PHASES)
    assert all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and sum(phases.values()) <= summary["step_ms"] * 1.01
    assert 0 < len(summary["ops"]) <= 5
    assert all(0 <= o["share"] <= 1 and o["calls_per_step"] > 0 for o in summary["ops"])
    printed = capsys.readouterr().out
    assert "decode batch 3" in printed and "forward" in printed


def test_prefill_profile_steps_the_prompts_in_budget_sized_steps(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    args = build_parser().parse_args([
        "bench", "profile", "--prefill", "--batch-size", "3", "--input-len", "20", "--top", "5",
        "--max-num-batched-tokens", "32", "--kv-cache-memory", str(1 << 24),
        "--json", str(out)])
    assert args.func(args) == 0
    summary = json.loads(out.read_text())
    assert summary["prefill"] is True
    assert summary["steps"] == 2  # 60 prompt tokens in steps of up to 32
    phases = summary["phases_ms"]
    assert phases["forward"] > 0 and sum(phases.values()) <= summary["step_ms"] * 1.01
    assert 0 < len(summary["ops"]) <= 5
    assert "prefill of 3 prompts x 20 tokens in 2 steps" in capsys.readouterr().out


def test_phase_timers_are_removed_again():
    from server import LLM, SamplingParams

    engine = LLM(kv_cache_memory=1 << 24).engine
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0))
    runner, scheduler = engine.runner, engine.scheduler
    before = (vars(runner).get("sampler"), "_prepare" in vars(runner),
              "schedule" in vars(scheduler), "forward" in vars(runner.model))
    step_ms, phases = profile_step.phase_times(engine, 2)
    assert step_ms > 0 and phases["forward"] > 0
    after = (vars(runner).get("sampler"), "_prepare" in vars(runner),
             "schedule" in vars(scheduler), "forward" in vars(runner.model))
    assert after == before
    while engine.has_unfinished_requests():
        engine.step()


def test_compiled_kernels_are_listed_and_unwrapped_again():
    from pagedserve_kernels import cpu_attention, cpu_decoder, cpu_fused
    from server import LLM, SamplingParams
    from server.model_runner.cpu import COMPILED_DECODE_ROWS

    if not cpu_fused.available():
        pytest.skip("no C++ compiler: nothing compiled to list")
    originals = (cpu_attention.paged_decode, cpu_fused.add_rms_norm, cpu_decoder.decode_step)
    engine = LLM(kv_cache_memory=1 << 24, dtype="float32").engine
    for i in range(2):
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=8, temperature=0.0))
    names = {o["op"] for o in profile_step.top_ops(engine, 2, 100)}  # the prompts, then decodes
    assert {"pagedserve::add_rms_norm", "pagedserve::decode_step"} <= names
    for i in range(2, COMPILED_DECODE_ROWS + 2):  # past the compiled step's rows: layer by layer
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=8, temperature=0.0))
    engine.step()
    names = {o["op"] for o in profile_step.top_ops(engine, 1, 100)}
    assert "pagedserve::paged_decode" in names
    assert (cpu_attention.paged_decode, cpu_fused.add_rms_norm,
            cpu_decoder.decode_step) == originals
    while engine.has_unfinished_requests():
        engine.step()


def test_decode_parts_measures_the_compiled_step():
    from pagedserve_kernels import cpu_decoder
    from server.assets import BUNDLED_MODEL_DIR
    from server.bench import decode_parts

    if not cpu_decoder.available():
        pytest.skip("no C++ compiler: no compiled decode step")
    parts = decode_parts.measure(BUNDLED_MODEL_DIR, batch_size=3, context=40, repeats=1)
    assert parts["step_ms"] > 0 and parts["step_1_token_ms"] > 0 and parts["logits_ms"] > 0
    assert parts["attention_ms"] == parts["step_ms"] - parts["step_1_token_ms"]

"""How many rows the compiled decode step takes (server/model_runner/step_choice.py): the rule
on synthetic timings, the disk cache, and one real measurement on a tiny model, whose outcome
this test does not predict (it depends on the machine), only its form and its reuse."""

from __future__ import annotations

import pytest
import torch

from server.model_runner import prefill_choice, step_choice
from server.model_runner.cpu import COMPILED_DECODE_ROWS
from server.models.layers import packed_gemm

BOUNDS = (1, 2, 4, 8, 16)


def timed(step: dict[int, float], layers: dict[int, float], asked: list[int]):
    def measure(rows: int) -> tuple[float, float]:
        asked.append(rows)
        return step[rows], layers[rows]
    return measure


def test_the_step_takes_the_run_of_buckets_where_it_is_faster():
    asked: list[int] = []
    step = {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0, 16: 1.0}
    layers = {1: 2.0, 2: 2.0, 4: 2.0, 8: 1.9, 16: 9.0}
    assert step_choice.choose_rows(BOUNDS, timed(step, layers, asked)) == 4
    assert asked == [1, 2, 4, 8]  # the first loss ends it: a later win is not taken
    assert step_choice.choose_rows(BOUNDS, timed({1: 2.0}, {1: 2.0}, [])) == 0  # a tie loses
    assert step_choice.choose_rows(BOUNDS, timed(dict.fromkeys(BOUNDS, 1.0),
                                                 dict.fromkeys(BOUNDS, 2.0), [])) == 16


def test_a_measured_range_is_cached_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path))
    asked: list[int] = []
    measure = timed({1: 1.0, 2: 1.0, 4: 3.0}, {1: 2.0, 2: 2.0, 4: 2.0}, asked)
    assert step_choice.measured_rows(["model a"], (1, 2, 4), measure) == 2
    assert step_choice.measured_rows(["model a"], (1, 2, 4), measure) == 2
    assert asked == [1, 2, 4]  # measured once
    assert step_choice.measured_rows(["model b"], (1, 2, 4), measure) == 2
    assert asked == [1, 2, 4] * 2
    (tmp_path / "compiled-step.json").write_text("not json")
    assert step_choice.measured_rows(["model a"], (1, 2, 4), measure) == 2  # measured again


def test_the_measured_batch_changes_nothing_in_the_cache():
    ids, positions, md = step_choice.decode_batch(3, num_blocks=5, block_size=4,
                                                  sliding_window=None, backend="torch")
    assert ids.shape == (3,) and positions.tolist() == [19, 19, 19]  # 5 blocks of 4: 20 tokens
    assert md.seq_lens.tolist() == [20] * 3 and (md.slot_mapping < 0).all()
    assert md.block_table.tolist() == [[0, 1, 2, 3, 4]] * 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_server_start_measures_once_and_then_reads_the_cache(tmp_path, monkeypatch, dtype):
    from server import LLM
    from tests.model_factory import make_tiny_model

    monkeypatch.delenv("PAGEDSERVE_SMALL_GEMM_ROWS")  # measure, as a server start does
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    packed_gemm.gemm_table.cache_clear()
    calls: list[int] = []
    real = step_choice.choose_rows

    def counted(bounds, measure):
        calls.append(len(bounds))
        return real(bounds, measure)

    monkeypatch.setattr(step_choice, "choose_rows", counted)
    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype=dtype)
    try:
        rows = []
        for _ in range(2):
            # The own GEMM everywhere, so that every projection has the step's copy.
            llm = LLM(str(model_dir), dtype=dtype, device="cpu", kv_cache_memory=1 << 22,
                      cpu_gemm="own")
            step = llm.engine.runner.compiled_step
            rows.append(0 if step is None else step.max_rows)
            out = llm.generate([[5, 6, 7]], step_choice_params())
            assert len(out[0].outputs[0].token_ids) == 4
    finally:
        packed_gemm.gemm_table.cache_clear()
    # 1, 2, 4, ... 64 measured once; so were the prompt attention's lengths (prefill_choice)
    assert calls == [COMPILED_DECODE_ROWS.bit_length(),
                     len(prefill_choice.lengths(llm.engine.max_model_len))]
    assert rows[0] == rows[1] and rows[0] in (0, 1, 2, 4, 8, 16, 32, 64)
    assert llm.engine.runner.dtype == getattr(torch, dtype)


def step_choice_params():
    from server import SamplingParams
    return SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

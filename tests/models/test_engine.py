"""Engine behaviour through the offline API and EngineCore: sampling, n > 1, abort, stopping."""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from server.engine.core import EngineCore
from server.engine.fan_out import fan_out
from tests.models.conftest import random_prompts

SMALL_CACHE = 1 << 22


@pytest.fixture(scope="module")
def llm(model_dirs) -> LLM:
    return LLM(str(model_dirs["llama"]), kv_cache_memory=SMALL_CACHE)


def test_seeded_request_is_batch_invariant(llm):
    prompt = random_prompts(seed=10, count=1, min_len=12, max_len=13)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = random_prompts(seed=11, count=6, min_len=1, max_len=40)
    mixed_params = [SamplingParams(max_tokens=16, temperature=0.8, seed=i if i % 2 else None)
                    for i in range(6)]
    batch = llm.generate(others[:3] + [prompt] + others[3:],
                         mixed_params[:3] + [seeded] + mixed_params[3:])
    assert batch[3].outputs[0].token_ids == alone
    again = llm.generate([prompt] + others, [seeded] + mixed_params)[0]
    assert again.outputs[0].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_seeded_request_gives_the_same_text_after_preemption(model_dirs):
    """The runner drops a preempted request's state, but its seeded generator runs on."""
    prompts = random_prompts(seed=18, count=6, min_len=20, max_len=40)
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    roomy = LLM(str(model_dirs["llama"]), max_model_len=64, kv_cache_memory=SMALL_CACHE)
    alone = [roomy.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    tight = LLM(str(model_dirs["llama"]), max_model_len=64,
                kv_cache_memory=8 * roomy.engine.runner.bytes_per_block)
    together = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert together == alone


def test_n_completions_differ_and_are_reproducible_with_a_seed(llm):
    prompt = random_prompts(seed=12, count=1, min_len=20, max_len=21)[0]
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7)
    out = llm.generate([prompt], params)[0]
    completions = [tuple(c.token_ids) for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c) == 12 for c in completions)
    assert len(set(completions)) > 1
    assert [tuple(c.token_ids) for c in llm.generate([prompt], params)[0].outputs] == completions


def test_n_completions_share_prompt_blocks(model_dirs):
    """The front end fans n out into n engine requests; siblings scheduled in the same step hit
    the blocks the first one entered in the prefix cache when they were allocated."""
    engine = LLM(str(model_dirs["llama"]), kv_cache_memory=SMALL_CACHE).engine
    prompt = random_prompts(seed=13, count=1, min_len=40, max_len=41)[0]  # 2 full blocks + 8
    for child_id, params in fan_out("r", SamplingParams(n=3, max_tokens=8, temperature=1.0)):
        engine.add_request(child_id, prompt, params)
    engine.step()  # all three in one step: the first computes the prompt, the others hit it
    assert engine.kv_cache.stats.hits == 2 * 2 * 16
    tables = [engine.kv_cache.req_to_blocks[f"r#{i}"] for i in range(3)]
    shared = [b.block_id for b in tables[0][:2]]
    assert all([b.block_id for b in t[:2]] == shared for t in tables)
    assert all(b.ref_cnt == 3 for b in tables[0][:2])
    assert len({t[2].block_id for t in tables}) == 3  # the partial block is private
    engine.kv_cache.check_invariants()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_abort_frees_blocks_at_once_and_others_continue(model_dirs):
    engine = LLM(str(model_dirs["llama"]), kv_cache_memory=SMALL_CACHE).engine
    prompts = random_prompts(seed=14, count=2, min_len=30, max_len=31)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=10, temperature=0,
                                                           ignore_eos=True))
    engine.step()
    used = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    engine.abort_request("r0")
    assert engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks == used // 2
    engine.kv_cache.check_invariants()
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert set(tokens) == {"r1"} and len(tokens["r1"]) == 9
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_logprobs(llm):
    prompt = random_prompts(seed=15, count=1, min_len=10, max_len=11)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    total = 0.0
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert token_id in entry and len(entry) == 3  # greedy: the sampled token is the top one
        assert entry[token_id] == max(entry.values()) and entry[token_id] <= 0.0
        total += entry[token_id]
    assert completion.cumulative_logprob == pytest.approx(total)
    plain = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0))[0]
    assert plain.outputs[0].logprobs is None
    assert plain.outputs[0].token_ids == completion.token_ids


def test_stop_token_ids_min_tokens_and_length(llm):
    prompt = random_prompts(seed=16, count=1, min_len=10, max_len=11)[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                   ignore_eos=True))[0].outputs[0].token_ids
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == greedy[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_at],
                                                min_tokens=12))[0].outputs[0]
    assert len(out.token_ids) == 12 and stop_at not in out.token_ids
    assert out.finish_reason == "length"


def test_max_model_len_caps_output(model_dirs):
    llm = LLM(str(model_dirs["llama"]), kv_cache_memory=SMALL_CACHE, max_model_len=32)
    prompt = random_prompts(seed=17, count=1, min_len=29, max_len=30)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=None, temperature=0,
                                                ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([prompt + [5, 6, 7]], SamplingParams())


def test_prompt_forms(llm):
    ids = llm.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_tokens=4, temperature=0)
    by_text = llm.generate("Once upon a time", params)[0]
    assert by_text.prompt == "Once upon a time" and by_text.prompt_token_ids == ids
    by_ids = llm.generate(ids, params)[0]
    by_list = llm.generate([ids, ids], params)
    by_dict = llm.generate({"prompt_token_ids": ids}, params)[0]
    expected = by_text.outputs[0].token_ids
    assert by_ids.outputs[0].token_ids == expected
    assert [o.outputs[0].token_ids for o in by_list] == [expected, expected]
    assert by_dict.outputs[0].token_ids == expected
    per_prompt = llm.generate([ids, ids], [params, SamplingParams(max_tokens=2, temperature=0)])
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [4, 2]


def test_bad_requests_are_rejected_and_leave_the_engine_clean(llm):
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 100000]], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="leaves no room for output"):
        llm.generate([[1] * llm.engine.max_model_len], SamplingParams())
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate([[1, 2], [3]], [SamplingParams()])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_unknown_engine_argument():
    with pytest.raises(TypeError, match="unknown engine argument 'max_num_seq'"):
        LLM(max_num_seq=3)


def test_engine_core_is_usable_without_llm(model_dirs):
    from server.config import EngineConfig

    engine = EngineCore(EngineConfig.from_kwargs(str(model_dirs["qwen3"]),
                                                 kv_cache_memory=SMALL_CACHE))
    engine.add_request("a", [1, 5, 9], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [1, 5, 9], SamplingParams())
    engine.add_request("b#1", [1, 5], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="one completion per request"):
        engine.add_request("c", [1, 5], SamplingParams(n=2, max_tokens=1))
    assert engine.unfinished_request_ids() == ["a", "b#1"]
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    outputs = [o for o in outputs if o.request_id == "a"]
    assert [len(o.new_token_ids) for o in outputs] == [1, 1, 1]
    assert outputs[-1].finish_reason in ("length", "stop")


def test_a_failing_step_names_only_the_requests_it_ran(model_dirs, monkeypatch):
    from server.config import EngineConfig
    from server.outputs import StepError

    engine = EngineCore(EngineConfig.from_kwargs(str(model_dirs["llama"]),
                                                 kv_cache_memory=SMALL_CACHE, max_num_seqs=1))
    engine.add_request("a", [1, 5, 9], SamplingParams(max_tokens=3, temperature=0))
    engine.add_request("b", [1, 5], SamplingParams(max_tokens=2, temperature=0))
    real = engine.runner.execute

    def broken(output):
        monkeypatch.setattr(engine.runner, "execute", real)  # fails once
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.runner, "execute", broken)
    with pytest.raises(StepError, match="injected") as e:
        engine.step()
    assert e.value.request_ids == ["a"]  # b was waiting: the step did not run it
    engine.abort_request("a")  # what the engine loop does with the step's requests
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert [o.request_id for o in outputs] == ["b", "b"] and outputs[-1].finished
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks

"""Greedy output equals Hugging Face transformers token for token, under every scheduling
regime: plain batches, preemption, chunked prefill, prefix caching on and off."""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from tests.models.conftest import ARCHS, MAX_NEW_TOKENS, random_prompts

GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
SMALL_CACHE = 1 << 22


def assert_parity(llm: LLM, model_dir, prompts, reference) -> list:
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == reference(model_dir, prompt, MAX_NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"
    llm.engine.kv_cache.check_invariants()
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    return outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_mixed_lengths(arch, model_dirs, reference):
    prompts = random_prompts(seed=1, count=10, min_len=1, max_len=45)
    llm = LLM(str(model_dirs[arch]), kv_cache_memory=SMALL_CACHE)
    assert_parity(llm, model_dirs[arch], prompts, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_keeps_parity(arch, model_dirs, reference):
    prompts = random_prompts(seed=2, count=8, min_len=20, max_len=40)
    llm = LLM(str(model_dirs[arch]), max_model_len=64, kv_cache_memory=SMALL_CACHE)
    # Rebuild with a pool of 10 blocks of 16 tokens: far less than 8 requests of ~55 tokens need.
    llm = LLM(str(model_dirs[arch]), max_model_len=64,
              kv_cache_memory=10 * llm.engine.runner.bytes_per_block)
    assert llm.engine.kv_cache.num_blocks == 10
    assert_parity(llm, model_dirs[arch], prompts, reference)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_keeps_parity(arch, model_dirs, reference):
    prompts = random_prompts(seed=3, count=8, min_len=6, max_len=40)
    llm = LLM(str(model_dirs[arch]), kv_cache_memory=SMALL_CACHE, max_num_batched_tokens=5)
    steps_before = []
    original_schedule = llm.engine.scheduler.schedule

    def spy():
        out = original_schedule()
        steps_before.append(out.num_scheduled_tokens)
        return out

    llm.engine.scheduler.schedule = spy
    assert_parity(llm, model_dirs[arch], prompts, reference)
    assert max(steps_before) <= 5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefixes(arch, prefix_caching, model_dirs, reference):
    shared = random_prompts(seed=4, count=1, min_len=37, max_len=38)[0]
    prompts = random_prompts(seed=5, count=8, min_len=1, max_len=20, prefix=shared)
    prompts.append(list(shared))  # a prompt that is exactly the shared prefix
    llm = LLM(str(model_dirs[arch]), kv_cache_memory=SMALL_CACHE,
              enable_prefix_caching=prefix_caching)
    first = assert_parity(llm, model_dirs[arch], prompts[:1], reference)
    rest = assert_parity(llm, model_dirs[arch], prompts[1:], reference)
    assert first[0].num_cached_tokens == 0
    if prefix_caching:
        # 37 shared tokens = 2 full blocks of 16, still cached after the first request ended.
        assert all(o.num_cached_tokens >= 32 for o in rest)
    else:
        assert all(o.num_cached_tokens == 0 for o in rest)

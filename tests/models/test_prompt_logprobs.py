"""Prompt logprobs (SamplingParams.prompt_logprobs) equal transformers' log-softmax of the
prompt's own logits, position by position, whatever the scheduling: one step, chunked prefill,
a prefix already in the cache (computed again, never a gap), preemption, and n > 1."""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from tests.model_factory import _hf_model
from tests.models.conftest import random_prompts

TOP = 3


def hf_prompt_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p scores prompt token p + 1."""
    with torch.no_grad():
        logits = _hf_model(model_dir)(input_ids=torch.tensor([prompt]), use_cache=False).logits
    return torch.log_softmax(logits[0, :-1].float(), dim=-1)


def assert_matches(model_dir, prompt: list[int], got: list) -> None:
    expected = hf_prompt_logprobs(model_dir, prompt)
    assert got[0] is None and len(got) == len(prompt)
    for p, entry in enumerate(got[1:]):
        token = prompt[p + 1]
        top = expected[p].topk(TOP)
        assert set(entry) == {token, *top.indices.tolist()}, (p, entry)
        for t, lp in entry.items():
            assert lp == pytest.approx(float(expected[p, t]), abs=1e-4), (p, t)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 2, "temperature": 0.0, "prompt_logprobs": TOP, **kw})


def test_one_step_and_chunked_prefill(model_dirs):
    model_dir = model_dirs["llama"]
    prompts = random_prompts(seed=5, count=4, min_len=2, max_len=40) + [[7]]
    for budget, max_tokens in ((None, 1), (5, 2)):  # 5: every prompt is split across steps
        extra = {} if budget is None else {"max_num_batched_tokens": budget}
        llm = LLM(str(model_dir), kv_cache_memory=1 << 22, **extra)
        # max_tokens=1: the request finishes in the step that delivers them
        for prompt, out in zip(prompts, llm.generate(prompts, params(max_tokens=max_tokens))):
            if len(prompt) == 1:
                assert out.prompt_logprobs == [None]
            else:
                assert_matches(model_dir, prompt, out.prompt_logprobs)


def test_a_cached_prefix_is_computed_again(model_dirs):
    model_dir = model_dirs["qwen2"]
    shared = random_prompts(seed=6, count=1, min_len=40, max_len=41)[0]
    llm = LLM(str(model_dir), kv_cache_memory=1 << 22, enable_prefix_caching=True)
    llm.generate([shared + [9, 10]], SamplingParams(max_tokens=1))  # the prefix is now cached
    prompt = shared + [11, 12, 13]
    out = llm.generate([prompt], params())[0]
    assert_matches(model_dir, prompt, out.prompt_logprobs)
    plain = llm.generate([shared + [14]], SamplingParams(max_tokens=1))[0]
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None


def test_preemption_and_n_keep_them_whole(model_dirs):
    model_dir = model_dirs["llama"]
    prompts = random_prompts(seed=7, count=6, min_len=20, max_len=40)
    probe = LLM(str(model_dir), max_model_len=64, kv_cache_memory=1 << 22)
    llm = LLM(str(model_dir), max_model_len=64, max_num_batched_tokens=16,
              kv_cache_memory=8 * probe.engine.runner.bytes_per_block)
    outs = llm.generate(prompts, params(n=2, max_tokens=20, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_matches(model_dir, prompt, out.prompt_logprobs)
    llm.engine.kv_cache.check_invariants()
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks

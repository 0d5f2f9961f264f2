"""Preemption storm: a KV pool so small that a large share of the steps preempt, 64 concurrent
greedy requests; every output equals the same request run alone, and the pool's invariants hold
after every step and at the end."""

from __future__ import annotations

import random

import pytest

from server import LLM, SamplingParams
from tests.model_factory import make_tiny_model

NUM_REQUESTS = 64
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("storm"), "llama")


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 36))]
            for _ in range(NUM_REQUESTS)]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_outputs_survive_a_preemption_storm(model_dir, prefix_caching):
    prompts = _prompts(seed=7)
    roomy = LLM(str(model_dir), max_model_len=80, kv_cache_memory=1 << 22,
                enable_prefix_caching=prefix_caching)
    alone = [roomy.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]

    # Blocks of 4 tokens: a running request needs a new block every 4 steps; 256 of them
    # hold about a third of what the 64 requests need (35% of the steps preempt).
    tight = LLM(str(model_dir), max_model_len=80, block_size=4, num_blocks=256,
                enable_prefix_caching=prefix_caching)
    engine = tight.engine
    steps, preempting = [], []
    schedule = engine.scheduler.schedule

    def checked_schedule():
        engine.kv_cache.check_invariants()
        out = schedule()
        steps.append(out)
        if out.preempted_req_ids:
            preempting.append(out)
        return out

    engine.scheduler.schedule = checked_schedule
    together = [o.outputs[0].token_ids for o in tight.generate(prompts, GREEDY)]
    assert len(preempting) >= 0.3 * len(steps), (len(preempting), len(steps))
    assert together == alone
    engine.kv_cache.check_invariants()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.has_unfinished_requests()

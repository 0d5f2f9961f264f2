"""Hypothesis at the engine's own door, under the API's checks: batches of requests with any
prompt ids and sampling parameters, some aborted part-way, on a KV pool small enough to preempt.
Every request the engine cannot serve is refused with ValueError when it is added (or when its
SamplingParams is built), every other one finishes within its token cap with ids in the
vocabulary, no step raises, and afterwards the pool is whole."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.assets import BUNDLED_MODEL_DIR
from server.config import EngineConfig
from server.engine.core import EngineCore
from server.sampling_params import SamplingParams

VOCAB = 512
MAX_MODEL_LEN = 40
CASES = int(os.environ.get("PAGEDSERVE_FUZZ_CASES", "25")) * 2
OUTCOMES = {"served": 0, "refused": 0, "aborted": 0, "steps": 0}

vocab_id = st.integers(0, VOCAB - 1)
token_id = st.one_of(vocab_id, st.integers(-3, VOCAB + 3))
in_range = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 600),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.1, 2),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 64)), "min_tokens": st.integers(0, 8),
    "stop_token_ids": st.lists(vocab_id, max_size=3), "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "logit_bias": st.one_of(st.none(), st.dictionaries(vocab_id, st.floats(-100, 100),
                                                       max_size=3)),
})
wide_int = st.one_of(st.integers(-3, 3), st.integers(-(2**70), 2**70))
wide_float = st.floats(allow_nan=True, allow_infinity=True)
anything = st.fixed_dictionaries({}, optional={
    "temperature": wide_float, "top_p": wide_float, "top_k": wide_int, "min_p": wide_float,
    "presence_penalty": wide_float, "frequency_penalty": wide_float,
    "repetition_penalty": wide_float, "seed": wide_int, "max_tokens": wide_int,
    "min_tokens": wide_int, "stop_token_ids": st.lists(token_id, max_size=3),
    "logprobs": wide_int, "logit_bias": st.dictionaries(token_id, wide_float, max_size=3),
})
params = st.integers(0, 3).flatmap(lambda k: anything if k == 0 else in_range)
prompt = st.integers(0, 3).flatmap(
    lambda k: st.lists(token_id, max_size=MAX_MODEL_LEN + 2) if k == 0
    else st.lists(vocab_id, min_size=1, max_size=MAX_MODEL_LEN // 2))
request = st.tuples(prompt, params,
                    st.one_of(st.none(), st.integers(0, 12)))  # abort after this many steps


@pytest.fixture(scope="module")
def engine():
    # 12 blocks of 4 tokens: room for one request of the full context, so batches preempt.
    return EngineCore(EngineConfig.from_kwargs(str(BUNDLED_MODEL_DIR), max_model_len=MAX_MODEL_LEN,
                                               block_size=4, num_blocks=12))


@given(batch=st.lists(request, min_size=1, max_size=6))
@settings(max_examples=CASES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_any_request_is_served_or_refused_and_the_pool_stays_whole(engine, batch):
    caps: dict[str, int] = {}
    abort_at: dict[str, int] = {}
    for i, (prompt, fields, abort_after) in enumerate(batch):
        request_id = f"r{i}"
        try:
            sampling = SamplingParams(**fields)
            engine.add_request(request_id, prompt, sampling)
        except ValueError:
            OUTCOMES["refused"] += 1
            continue
        caps[request_id] = min(sampling.max_tokens or MAX_MODEL_LEN, MAX_MODEL_LEN - len(prompt))
        if abort_after is not None:
            abort_at[request_id] = abort_after
    produced = {request_id: 0 for request_id in caps}
    finished: set[str] = set()
    for step in range(10 * MAX_MODEL_LEN * len(batch) + 10):
        for request_id, when in abort_at.items():
            if when == step and request_id not in finished:
                engine.abort_request(request_id)
                finished.add(request_id)
                OUTCOMES["aborted"] += 1
        if not engine.has_unfinished_requests():
            break
        OUTCOMES["steps"] += 1
        for out in engine.step():
            assert all(0 <= t < VOCAB for t in out.new_token_ids), out
            produced[out.request_id] += len(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
    assert not engine.has_unfinished_requests(), engine.unfinished_request_ids()
    OUTCOMES["served"] += len(caps)
    assert finished == set(caps)
    assert all(produced[r] <= caps[r] for r in caps), (produced, caps)
    check = engine.check()
    assert check.problem is None, check
    assert check.num_free_blocks == check.num_blocks


def test_the_generated_batches_reached_the_model(engine):
    """The test above ran first: most of its requests were served, some preempted."""
    print(f"\nengine-level cases: {OUTCOMES}, preemptions {engine.scheduler.num_preemptions}")
    assert OUTCOMES["served"] >= OUTCOMES["refused"] / 2 and OUTCOMES["steps"] >= CASES
    assert engine.scheduler.num_preemptions > 0

"""Unit tests for the scheduler step (server/scheduler/scheduler.py, DESIGN.md §3).

Pure Python: a real KVCacheManager (block_size 4), hand-made requests, and a fake model runner
that samples `1000 + num_output_tokens` (or a test's own rule) for every request whose scheduled
tokens reach its last token. Every expected value below is worked out by hand from the design;
after every schedule() and update_from_output() the KV manager's and the scheduler's invariants
are checked (`_check`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import SchedulerConfig
from server.kv_cache.manager import KVCacheManager
from server.outputs import EngineCoreOutput, RunnerOutput, SampleResult
from server.request import Request, RequestStatus
from server.sampling_params import SamplingParams
from server.scheduler.output import SchedulerOutput
from server.scheduler.scheduler import Scheduler

BS = 4  # block_size
ABORT = RequestStatus.FINISHED_ABORTED
TokenFn = Callable[[Request], int]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# helpers


def make(num_blocks: int = 64, *, budget: int = 64, max_num_seqs: int = 16,
         max_model_len: int = 256, caching: bool = False, long_prefill: int = 0) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=BS, enable_caching=caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             long_prefill_token_threshold=long_prefill)
    return Scheduler(config, kv, max_model_len=max_model_len)


def req(rid: str, prompt: int | list[int], max_tokens: int | None = 16, eos=(),
        **params) -> Request:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, tokens, sp, eos_token_ids=eos, max_tokens=max_tokens)


def counting(r: Request) -> int:
    return 1000 + r.num_output_tokens


def expected_outputs(n: int) -> list[int]:
    return list(range(1000, 1000 + n))


def _check(s: Scheduler) -> None:
    """KV-manager invariants plus the scheduler's own bookkeeping."""
    kv = s.kv_cache
    kv.check_invariants()
    running_ids = [r.request_id for r in s.running]
    waiting_ids = [r.request_id for r in s.waiting]
    assert len(s.running) <= s.config.max_num_seqs
    assert len(set(running_ids + waiting_ids)) == len(running_ids) + len(waiting_ids)
    assert set(s.requests) == set(running_ids) | set(waiting_ids)
    # Only running requests hold blocks, exactly enough for their computed tokens.
    assert set(kv.req_to_blocks) == set(running_ids)
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert 0 < r.num_computed_tokens <= r.num_tokens
        blocks = kv.req_to_blocks[r.request_id]
        assert len(blocks) == cdiv(r.num_computed_tokens, BS), (r, blocks)
        # A block enters the prefix cache only once its tokens are computed (or in this step).
        num_full = r.num_computed_tokens // BS
        for i, block in enumerate(blocks):
            if kv.enable_caching and i < num_full:
                assert block.block_hash == r.block_hashes[i], (r, i)
            else:
                assert block.block_hash is None, (r, i)


# The runner's view of each scheduler: request id -> (token ids, block table), kept from the
# SchedulerOutputs alone, as the model runner keeps it.
_RUNNER_VIEWS: weakref.WeakKeyDictionary[Scheduler, dict[str, tuple[list[int], list[int]]]] = (
    weakref.WeakKeyDictionary())
# The requests of each scheduler's last schedule() (an abort before update removes them from it).
_SCHEDULED: weakref.WeakKeyDictionary[Scheduler, dict[str, Request]] = weakref.WeakKeyDictionary()


def table(s: Scheduler, request_id: str) -> list[int]:
    return _RUNNER_VIEWS[s][request_id][1]


def schedule(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    _check(s)
    ids = [e.request_id for e in out.scheduled]
    assert len(ids) == len(set(ids))
    assert out.num_scheduled_tokens == sum(e.num_scheduled_tokens for e in out.scheduled)
    assert out.num_scheduled_tokens <= s.config.max_num_batched_tokens
    view = _RUNNER_VIEWS.setdefault(s, {})
    for request_id in [*out.finished_req_ids, *out.preempted_req_ids]:
        view.pop(request_id, None)
    for e in out.scheduled:
        assert e.num_scheduled_tokens >= 1
        request = s.requests[e.request_id]
        if e.new_request is not None:
            assert e.request_id not in view
            assert e.new_request.token_ids == request.all_token_ids
            assert e.new_request.num_prompt_tokens == request.num_prompt_tokens
            view[e.request_id] = (list(e.new_request.token_ids), list(e.new_block_ids))
        else:
            view[e.request_id][1].extend(e.new_block_ids)
        tokens, block_ids = view[e.request_id]
        assert tokens == request.all_token_ids
        assert block_ids == s.kv_cache.get_block_ids(e.request_id)
        assert e.samples == (e.num_computed_tokens + e.num_scheduled_tokens >= request.num_tokens)
    _SCHEDULED[s] = {e.request_id: s.requests[e.request_id] for e in out.scheduled}
    return out


def update(s: Scheduler, out: SchedulerOutput, token_fn: TokenFn = counting,
           all_samples: bool = False) -> list[EngineCoreOutput]:
    """The fake runner: a sample for each request that reached its last token (or for every
    scheduled request with all_samples, to show that mid-prefill samples are dropped)."""
    samples = {e.request_id: SampleResult(token_fn(_SCHEDULED[s][e.request_id]))
               for e in out.scheduled if all_samples or e.samples}
    outputs = s.update_from_output(out, RunnerOutput(samples))
    view = _RUNNER_VIEWS[s]
    for e in out.scheduled:
        if e.samples:  # the runner appends its own samples
            view[e.request_id][0].append(samples[e.request_id].token_id)
    _check(s)
    return outputs


def step(s: Scheduler, token_fn: TokenFn = counting):
    out = schedule(s)
    return out, update(s, out, token_fn)


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request_id, num_computed_tokens before the step, num_scheduled_tokens) in batch order."""
    return [(e.request_id, e.num_computed_tokens, e.num_scheduled_tokens)
            for e in out.scheduled]


def run_to_completion(s: Scheduler, token_fn: TokenFn = counting, max_steps: int = 500):
    finished: dict[str, EngineCoreOutput] = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return finished
        out, outputs = step(s, token_fn)
        assert not out.empty, f"no progress: running={s.running} waiting={list(s.waiting)}"
        finished.update({o.request_id: o for o in outputs if o.finished})
    raise AssertionError("requests did not finish")


# --------------------------------------------------------------------------------------------
# token budget and chunked prefill


def test_budget_split_fcfs_last_one_chunked():
    s = make(budget=25)
    reqs = [req(rid, 10) for rid in "abcd"]
    for r in reqs:
        s.add_request(r)
    out = schedule(s)
    assert plan(out) == [("a", 0, 10), ("b", 0, 10), ("c", 0, 5)]
    assert out.num_scheduled_tokens == 25
    assert [e.samples for e in out.scheduled] == [True, True, False]
    assert [len(table(s, e.request_id)) for e in out.scheduled] == [3, 3, 2]
    assert [r.request_id for r in s.running] == ["a", "b", "c"]
    assert [r.request_id for r in s.waiting] == ["d"] and reqs[3].status == RequestStatus.WAITING
    outputs = update(s, out)
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("a", [1000]), ("b", [1000])]
    assert reqs[2].output_token_ids == [] and reqs[2].num_computed_tokens == 5

    # Running first (two decodes, then c's last chunk), then d with what is left (25 - 7).
    out, outputs = step(s)
    assert plan(out) == [("a", 10, 1), ("b", 10, 1), ("c", 5, 5), ("d", 0, 10)]
    assert out.num_scheduled_tokens == 17
    assert [o.request_id for o in outputs] == ["a", "b", "c", "d"]
    assert reqs[0].output_token_ids == [1000, 1001]


def test_chunked_prefill_continues_and_discards_mid_prefill_samples():
    s = make(budget=8)
    r = req("a", 23, max_tokens=3)
    s.add_request(r)
    expected = [(0, 8, False), (8, 8, False), (16, 7, True)]
    for i, (before, num, samples) in enumerate(expected):
        out = schedule(s)
        assert plan(out) == [("a", before, num)]
        assert out.scheduled[0].samples is samples
        assert r.num_computed_tokens == before + num
        assert len(table(s, out.scheduled[0].request_id)) == cdiv(before + num, BS)
        outputs = update(s, out, token_fn=lambda _r, i=i: 7 + i, all_samples=True)
        if not samples:  # the runner sampled mid-prefill; the scheduler drops it
            assert outputs == [] and r.output_token_ids == [] and r.num_tokens == 23
    assert [(o.new_token_ids, o.finished) for o in outputs] == [([9], False)]
    assert r.output_token_ids == [9]
    out, outputs = step(s)
    assert plan(out) == [("a", 23, 1)] and r.num_computed_tokens == 24
    assert r.output_token_ids == [9, 1001]


def test_long_prefill_token_threshold_caps_chunks():
    s = make(budget=100, long_prefill=5)
    r = req("a", 12, max_tokens=2)
    s.add_request(r)
    assert plan(step(s)[0]) == [("a", 0, 5)]
    assert plan(step(s)[0]) == [("a", 5, 5)]
    out, outputs = step(s)
    assert plan(out) == [("a", 10, 2)] and [o.new_token_ids for o in outputs] == [[1000]]


def test_mixed_decode_and_prefill_chunk_in_one_step():
    s = make(budget=8)
    a = req("a", 4, max_tokens=10)
    s.add_request(a)
    step(s)
    b = req("b", 20, max_tokens=10)
    s.add_request(b)
    out, outputs = step(s)
    assert plan(out) == [("a", 4, 1), ("b", 0, 7)]  # the decode is not starved by b's prompt
    assert [o.request_id for o in outputs] == ["a"]
    out, _ = step(s)
    assert plan(out) == [("a", 5, 1), ("b", 7, 7)]
    c = req("c", 2)
    s.add_request(c)
    out, outputs = step(s)
    # b's last 6 tokens with the decode; c gets the 1 token of budget left.
    assert plan(out) == [("a", 6, 1), ("b", 14, 6), ("c", 0, 1)]
    assert [o.request_id for o in outputs] == ["a", "b"] and b.output_token_ids == [1000]
    out, outputs = step(s)
    assert plan(out) == [("a", 7, 1), ("b", 20, 1), ("c", 1, 1)]
    assert [o.request_id for o in outputs] == ["a", "b", "c"]


def test_no_waiting_request_admitted_when_running_requests_use_the_budget():
    s = make(budget=2)
    s.add_request(req("a", 1))
    s.add_request(req("b", 1))
    step(s)
    s.add_request(req("c", 1))
    for i in range(3):
        out, _ = step(s)
        assert plan(out) == [("a", 1 + i, 1), ("b", 1 + i, 1)]
        assert [r.request_id for r in s.waiting] == ["c"]


def test_max_num_seqs_caps_running_and_admits_as_others_finish():
    s = make(budget=100, max_num_seqs=2)
    for rid in "abcd":
        s.add_request(req(rid, 4, max_tokens=2))
    out, _ = step(s)
    assert plan(out) == [("a", 0, 4), ("b", 0, 4)]
    assert [r.request_id for r in s.waiting] == ["c", "d"]
    out, outputs = step(s)  # a and b finish in this step's update; c, d still wait
    assert plan(out) == [("a", 4, 1), ("b", 4, 1)]
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", "length")]
    assert s.num_running == 0 and s.num_waiting == 2
    out, _ = step(s)
    assert plan(out) == [("c", 0, 4), ("d", 0, 4)]
    assert out.finished_req_ids == {"a", "b"}
    assert s.kv_cache.num_free_blocks == 64 - 2


# --------------------------------------------------------------------------------------------
# preemption


def _preemption_scenario(caching: bool):
    """Pool of 4 blocks, budget 5, two 4-token prompts. Worked by hand:
    step 1: a 4 tokens (1 block), b 1 token (1 block)
    step 2: a decode (2nd block), b 3 tokens                 -> 1 block free
    step 3: a decode, b decode (b's 2nd block)               -> pool full
    steps 4, 5: decodes within the 2 blocks each             -> a, b have 9 and 8 tokens
    step 6: a needs a 3rd block, so b (newest) is preempted; b's first 4-token chunk would fit
            the block it left free, but nothing is admitted in a step that preempted."""
    s = make(4, budget=5, caching=caching)
    a = req("a", [1, 2, 3, 4], max_tokens=7)
    b = req("b", [5, 6, 7, 8], max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    plans = [plan(step(s)[0]) for _ in range(5)]
    assert plans == [[("a", 0, 4), ("b", 0, 1)], [("a", 4, 1), ("b", 1, 3)],
                     [("a", 5, 1), ("b", 4, 1)], [("a", 6, 1), ("b", 5, 1)],
                     [("a", 7, 1), ("b", 6, 1)]]
    assert s.kv_cache.num_free_blocks == 0
    assert b.output_token_ids == expected_outputs(4)

    out = schedule(s)
    assert out.preempted_req_ids == ["b"]
    assert plan(out) == [("a", 8, 1)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and s.num_preemptions == 1
    assert list(s.waiting) == [b] and s.running == [a]
    assert "b" not in s.kv_cache.req_to_blocks
    assert s.kv_cache.num_free_blocks == 1  # b freed 2, a took 1
    assert b.output_token_ids == expected_outputs(4)  # outputs survive preemption
    outputs = update(s, out)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", None)]
    return s, a, b


def test_preemption_newest_first_then_resume_without_prefix_cache():
    s, a, b = _preemption_scenario(caching=False)
    out, outputs = step(s)
    # b recomputes from scratch: its first chunk (4 of its 8 tokens) fits the free block.
    assert plan(out) == [("a", 9, 1), ("b", 0, 4)]
    assert out.preempted_req_ids == []
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length")]
    out, outputs = step(s)
    assert plan(out) == [("b", 4, 4)] and out.finished_req_ids == {"a"}
    assert [o.new_token_ids for o in outputs] == [[1004]]
    finished = run_to_completion(s)
    assert finished["b"].finish_reason == "length"
    assert a.output_token_ids == expected_outputs(7)
    assert b.output_token_ids == expected_outputs(6)
    assert s.kv_cache.num_free_blocks == 4


def test_preemption_resumes_with_prefix_hit_on_its_own_blocks():
    s, a, b = _preemption_scenario(caching=True)
    out, _ = step(s)  # b: hit on its block [5, 6, 7, 8], but 1 new + 1 free hit > 1 free block
    assert plan(out) == [("a", 9, 1)] and list(s.waiting) == [b]
    out, outputs = step(s)
    # a's blocks are free now; b's own cached prompt block is hit: 4 tokens need no recompute.
    assert plan(out) == [("b", 4, 4)] and out.finished_req_ids == {"a"}
    assert b.num_computed_tokens == 8
    assert len(table(s, out.scheduled[0].request_id)) == 2
    assert [o.new_token_ids for o in outputs] == [[1004]]
    assert b.num_cached_tokens == 0 and outputs[0].num_cached_tokens == 0  # set at first admission
    finished = run_to_completion(s)
    assert finished["b"].finish_reason == "length"
    assert a.output_token_ids == expected_outputs(7)
    assert b.output_token_ids == expected_outputs(6)
    assert s.kv_cache.num_free_blocks == 4


def test_newest_request_preempts_itself():
    s = make(3, budget=100)
    s.add_request(a := req("a", 3))
    s.add_request(b := req("b", 8))
    step(s)  # a: 1 block, b: 2 blocks; pool full
    out = schedule(s)
    # a's decode fits its block; b's 9th token needs a block and b is the newest.
    assert plan(out) == [("a", 3, 1)] and out.preempted_req_ids == ["b"]
    assert list(s.waiting) == [b] and b.status == RequestStatus.PREEMPTED
    assert s.kv_cache.num_free_blocks == 2
    update(s, out)
    assert a.output_token_ids == [1000, 1001] and b.output_token_ids == [1000]


def test_preemption_of_several_victims_keeps_their_order_at_the_front_of_waiting():
    # Pool of 4: a's prompt (16) in chunks of 8; b and c take one block each.
    s = make(4, budget=100, long_prefill=8)
    a = req("a", 16, max_tokens=1)
    b = req("b", 4, max_tokens=3)
    c = req("c", 4, max_tokens=3)
    for r in (a, b, c):
        s.add_request(r)
    s.add_request(d := req("d", 1, max_tokens=1))
    out, _ = step(s)
    assert plan(out) == [("a", 0, 8), ("b", 0, 4), ("c", 0, 4)]  # pool full, d waits
    out = schedule(s)
    # a's second chunk needs 2 more blocks: c goes, then b.
    assert out.preempted_req_ids == ["c", "b"]
    assert plan(out) == [("a", 8, 8)]
    assert list(s.waiting) == [b, c, d]
    update(s, out)  # a finishes (max_tokens 1)
    out, _ = step(s)
    assert plan(out) == [("b", 0, 5), ("c", 0, 5)]  # d's block does not fit: it waits
    assert out.finished_req_ids == {"a"} and list(s.waiting) == [d]
    run_to_completion(s)
    assert b.output_token_ids == c.output_token_ids == expected_outputs(3)
    assert d.output_token_ids == [1000]


def test_contending_requests_in_a_tiny_pool_never_lose_tokens():
    # Pool of 2 blocks: two requests that each need both blocks at their longest.
    s = make(2, budget=16, max_model_len=8)
    s.add_request(a := req("a", 3, max_tokens=None))
    s.add_request(b := req("b", 3, max_tokens=None))
    finished = run_to_completion(s)
    assert {rid: o.finish_reason for rid, o in finished.items()} == {"a": "length", "b": "length"}
    assert a.output_token_ids == b.output_token_ids == expected_outputs(5)
    assert s.num_preemptions >= 1 and s.kv_cache.num_free_blocks == 2


# --------------------------------------------------------------------------------------------
# prefix hits at admission


def test_prefix_hit_allocates_only_the_missing_blocks():
    s = make(20, budget=100, caching=True)
    prompt = list(range(1, 13))
    s.add_request(req("a", prompt, max_tokens=1))
    step(s)
    assert s.kv_cache.num_free_blocks == 20
    s.add_request(b := req("b", prompt, max_tokens=5))
    out, _ = step(s)
    assert plan(out) == [("b", 8, 4)]  # 2 of 3 blocks hit; the last token is always computed
    assert b.num_cached_tokens == 8
    assert len(table(s, out.scheduled[0].request_id)) == 3
    assert s.kv_cache.num_free_blocks == 17


def test_prefix_hit_with_chunk_caches_only_computed_blocks():
    s = make(32, budget=100, caching=True, long_prefill=4)
    base = list(range(1, 9))
    s.add_request(req("a", base + [50], max_tokens=1))
    run_to_completion(s)
    prompt = base + list(range(100, 120))  # 28 tokens; the first 8 are cached
    s.add_request(req("y", prompt, max_tokens=1))
    out, _ = step(s)
    assert plan(out) == [("y", 8, 4)]
    assert len(table(s, out.scheduled[0].request_id)) == 3
    s.add_request(req("z", prompt, max_tokens=1))
    out, _ = step(s)
    # y computes tokens 12..15 in this step; z may reuse at most those 16 tokens.
    assert plan(out) == [("y", 12, 4), ("z", 16, 4)]


def test_request_that_fits_an_empty_pool_is_admitted_after_a_prefix_hit():
    # 4 blocks = 16 slots; b (15 tokens) hits 12 cached tokens and needs 1 new block.
    s = make(4, budget=16, max_model_len=16, caching=True)
    prompt = list(range(1, 13))
    s.add_request(req("a", prompt, max_tokens=1))
    run_to_completion(s)
    s.add_request(b := req("b", prompt + [20, 21, 22], max_tokens=1))
    out, outputs = step(s)
    assert plan(out) == [("b", 12, 3)]
    assert outputs[0].finish_reason == "length" and b.output_token_ids == [1000]


# --------------------------------------------------------------------------------------------
# abort


def test_abort_running_request_frees_blocks_at_once():
    s = make(16, budget=100)
    s.add_request(a := req("a", 10))
    s.add_request(b := req("b", 5))
    step(s)
    assert s.kv_cache.num_free_blocks == 16 - 3 - 2
    assert s.finish_requests(["a"], ABORT) == [a]
    _check(s)
    assert a.status == ABORT and a.status.finished
    assert s.kv_cache.num_free_blocks == 16 - 2
    assert "a" not in s.kv_cache.req_to_blocks and s.running == [b] and "a" not in s.requests
    assert s.finish_requests(["a", "nope"], ABORT) == []  # already gone / unknown: ignored
    out, _ = step(s)
    assert out.finished_req_ids == {"a"} and plan(out) == [("b", 5, 1)]
    out, _ = step(s)
    assert out.finished_req_ids == set()


def test_abort_waiting_request_removes_it_from_the_queue():
    s = make(16, budget=100, max_num_seqs=1)
    s.add_request(req("a", 4))
    s.add_request(b := req("b", 4))
    s.add_request(req("c", 4))
    step(s)
    assert s.finish_requests(["b"], ABORT) == [b]
    _check(s)
    assert [r.request_id for r in s.waiting] == ["c"] and b.status == ABORT
    out, _ = step(s)
    assert out.finished_req_ids == {"b"}
    s.finish_requests(["a"], ABORT)
    out, _ = step(s)
    assert out.finished_req_ids == {"a"} and plan(out) == [("c", 0, 4)]
    assert b.num_computed_tokens == 0 and b.output_token_ids == []


def test_abort_between_schedule_and_update_gives_no_output():
    s = make(16, budget=100)
    s.add_request(a := req("a", 6))
    s.add_request(b := req("b", 6))
    out = schedule(s)
    s.finish_requests(["a"], ABORT)
    _check(s)
    outputs = update(s, out)
    assert [o.request_id for o in outputs] == ["b"]
    assert a.output_token_ids == [] and b.output_token_ids == [1000]
    assert s.kv_cache.num_free_blocks == 16 - 2
    out, _ = step(s)
    assert out.finished_req_ids == {"a"} and plan(out) == [("b", 6, 1)]


def test_abort_preempted_request():
    s, a, b = _preemption_scenario(caching=False)
    assert s.finish_requests(["b"], ABORT) == [b]
    _check(s)
    assert not s.waiting and b.status == ABORT
    out, _ = step(s)
    assert out.finished_req_ids == {"b"} and plan(out) == [("a", 9, 1)]


# --------------------------------------------------------------------------------------------
# stopping


def _run_single(r: Request, token_fn: TokenFn, max_model_len: int = 256):
    s = make(16, budget=100, max_model_len=max_model_len)
    s.add_request(r)
    outputs = []
    while s.has_unfinished_requests():
        _, outs = step(s, token_fn)
        outputs += outs
    assert s.kv_cache.num_free_blocks == 16 and not s.kv_cache.req_to_blocks
    assert schedule(s).finished_req_ids == {r.request_id}
    return outputs


def _seq(*tokens: int) -> TokenFn:
    return lambda r: tokens[r.num_output_tokens]


def test_eos_stops_with_reason_stop():
    r = req("a", 5, eos=[2])
    outputs = _run_single(r, _seq(7, 8, 2, 9))
    assert r.output_token_ids == [7, 8, 2]
    assert [o.finish_reason for o in outputs] == [None, None, "stop"]
    assert outputs[-1].stop_reason is None and r.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos_runs_to_max_tokens():
    r = req("a", 5, max_tokens=3, eos=[2], ignore_eos=True)
    outputs = _run_single(r, lambda _r: 2)
    assert r.output_token_ids == [2, 2, 2] and outputs[-1].finish_reason == "length"


def test_stop_token_ids_set_stop_reason():
    r = req("a", 5, eos=[2], stop_token_ids=[42])
    outputs = _run_single(r, _seq(7, 42, 9))
    assert r.output_token_ids == [7, 42]
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("stop", 42)
    assert r.stop_reason == 42


def test_min_tokens_suppresses_eos_and_stop_tokens():
    r = req("a", 5, max_tokens=10, eos=[2], stop_token_ids=[42], min_tokens=3)
    outputs = _run_single(r, _seq(2, 42, 2, 9))
    assert r.output_token_ids == [2, 42, 2]
    assert [o.finish_reason for o in outputs] == [None, None, "stop"]
    assert outputs[-1].stop_reason is None
    r = req("b", 5, max_tokens=10, stop_token_ids=[42], min_tokens=2)
    outputs = _run_single(r, _seq(42, 42, 9))
    assert r.output_token_ids == [42, 42] and outputs[-1].stop_reason == 42


def test_max_tokens_gives_length():
    r = req("a", 5, max_tokens=3, eos=[2])
    outputs = _run_single(r, counting)
    assert r.output_token_ids == expected_outputs(3)
    assert [o.finish_reason for o in outputs] == [None, None, "length"]
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_max_model_len_gives_length():
    r = req("a", 8, max_tokens=None)
    outputs = _run_single(r, counting, max_model_len=11)
    assert r.num_tokens == 11 and r.output_token_ids == expected_outputs(3)
    assert outputs[-1].finish_reason == "length"
    r = req("b", 11, max_tokens=None)  # a prompt of exactly max_model_len gets one token
    outputs = _run_single(r, counting, max_model_len=11)
    assert r.output_token_ids == [1000] and outputs[-1].finish_reason == "length"


def test_outputs_carry_logprobs_only_when_asked():
    s = make()
    s.add_request(req("a", 3, logprobs=0))
    s.add_request(req("b", 3))
    out = schedule(s)
    samples = {"a": SampleResult(5, logprob=-0.5), "b": SampleResult(6, logprob=-0.1)}
    outputs = {o.request_id: o for o in s.update_from_output(out, RunnerOutput(samples))}
    assert outputs["a"].new_logprobs == [samples["a"]] and outputs["b"].new_logprobs == []


# --------------------------------------------------------------------------------------------
# add_request


def test_add_request_rejects_a_duplicate_id():
    # Prompts are validated once, by EngineCore.add_request (tests/models/test_engine.py).
    s = make(max_model_len=10)
    s.add_request(req("a", 4))
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("a", 2))
    s.add_request(req("c", 10))
    assert [r.request_id for r in s.waiting] == ["a", "c"] and set(s.requests) == {"a", "c"}
    assert s.waiting[0].num_tokens == 4
    step(s)
    with pytest.raises(ValueError, match="already"):  # also while running
        s.add_request(req("a", 2))


# --------------------------------------------------------------------------------------------
# random workloads


@settings(max_examples=50, deadline=None, derandomize=True, report_multiple_bugs=False)
@given(
    num_blocks=st.integers(4, 12),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 4),
    caching=st.booleans(),
    prompts=st.lists(st.tuples(st.integers(1, 14), st.integers(1, 6), st.integers(0, 2)),
                     min_size=1, max_size=6),
    abort_at=st.one_of(st.none(), st.integers(0, 15)),
)
def test_random_workloads_finish_with_all_their_tokens(num_blocks, budget, max_num_seqs,
                                                       caching, prompts, abort_at):
    max_model_len = 16  # <= 4 blocks, so any request alone fits the pool
    s = make(num_blocks, budget=budget, max_num_seqs=max_num_seqs,
             max_model_len=max_model_len, caching=caching)
    reqs = {}
    for i, (n, max_tokens, family) in enumerate(prompts):
        # Prompts of one family share a prefix, to exercise prefix hits.
        r = req(f"r{i}", [family * 50 + t for t in range(n)], max_tokens=max_tokens)
        reqs[r.request_id] = r
        s.add_request(r)
    aborted = None
    for num_steps in range(1000):
        if not s.has_unfinished_requests():
            break
        if num_steps == abort_at and s.running:
            aborted = s.running[-1].request_id
            s.finish_requests([aborted], ABORT)
            _check(s)
        busy = s.has_unfinished_requests()
        out, _ = step(s)
        assert out.empty is not busy, "a request that fits the pool alone was never scheduled"
    else:
        raise AssertionError("did not finish")
    assert s.kv_cache.num_free_blocks == num_blocks
    for rid, r in reqs.items():
        if rid == aborted:
            continue
        n = min(r.max_tokens, max_model_len - r.num_prompt_tokens)
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_outputs(n)


def test_token_budget_defaults_by_device():
    from server.config import DEFAULT_MAX_NUM_BATCHED_TOKENS

    unset = SchedulerConfig()
    assert unset.for_device("cpu").max_num_batched_tokens == DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"]
    assert unset.for_device("cuda").max_num_batched_tokens == 2048
    assert SchedulerConfig(max_num_batched_tokens=96).for_device("cpu").max_num_batched_tokens == 96
    with pytest.raises(ValueError, match="for_device"):
        Scheduler(unset, KVCacheManager(16, 4, True), max_model_len=64)


# ---------------------------------------------------------------------- prompt logprobs
def _scored(out: SchedulerOutput, request_id: str) -> RunnerOutput:
    """A runner's answer that scores each prompt token the step's chunk predicts with -p."""
    result = RunnerOutput()
    for e in out.scheduled:
        if e.request_id == request_id:
            first = e.num_computed_tokens + 1
            last = min(e.num_computed_tokens + e.num_scheduled_tokens, 9)  # prompt of 10
            result.prompt_logprobs[e.request_id] = [SampleResult(t, -float(t))
                                                    for t in range(first, last + 1)]
        if e.samples:
            result.samples[e.request_id] = SampleResult(7)
    return result


def test_prompt_logprobs_gather_across_chunks_and_come_with_the_first_output():
    s = make(budget=4)
    s.add_request(req("a", 10, max_tokens=3, prompt_logprobs=0))
    delivered = []
    while s.has_unfinished_requests():
        out = s.schedule()
        for o in s.update_from_output(out, _scored(out, "a")):
            delivered.append(o.prompt_logprobs)
    assert [p.token_id for p in delivered[0]] == list(range(1, 10))  # positions 1..9, no gap
    assert delivered[1:] == [None, None]


def test_a_preemption_before_the_first_output_drops_what_was_gathered():
    s = make(budget=4)
    s.add_request(req("a", 10, max_tokens=2, prompt_logprobs=0))
    out = s.schedule()
    s.update_from_output(out, _scored(out, "a"))  # tokens 1..4 scored
    s.running.remove(s.requests["a"])
    s._preempt(s.requests["a"])
    outputs = []
    while s.has_unfinished_requests():
        out = s.schedule()
        outputs += s.update_from_output(out, _scored(out, "a"))
    assert [p.token_id for p in outputs[0].prompt_logprobs] == list(range(1, 10))


def test_a_request_wanting_prompt_logprobs_takes_no_prefix_cache_hit():
    s = make(caching=True)
    s.add_request(req("warm", 12, max_tokens=1))
    while s.has_unfinished_requests():
        update(s, schedule(s))
    s.add_request(req("plain", 12, max_tokens=1))
    s.add_request(req("scored", 12, max_tokens=1, prompt_logprobs=0))
    out = schedule(s)
    computed = {e.request_id: e.num_computed_tokens for e in out.scheduled}
    assert computed["plain"] > 0 and computed["scored"] == 0

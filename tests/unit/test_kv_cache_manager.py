"""Unit tests for KVCacheManager: block tables, prefix hits, eviction order, check-then-commit,
plus a hypothesis state machine that checks the bookkeeping against a shadow KV cache."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from server.kv_cache.block_hash import extend_block_hashes
from server.kv_cache.manager import NO_COMPUTED_BLOCKS, ComputedBlocks, KVCacheManager, cdiv
from server.request import Request
from server.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt_token_ids: list[int]) -> Request:
    return Request(request_id, prompt_token_ids, SamplingParams())


def admit(manager: KVCacheManager, request: Request, num_new_tokens: int | None = None,
          ) -> tuple[ComputedBlocks, list | None]:
    """What the scheduler does for a waiting request: look up hits, allocate, advance."""
    computed = manager.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - computed.num_tokens
    new_blocks = manager.allocate_slots(request, num_new_tokens, computed)
    if new_blocks is not None:
        request.num_computed_tokens += computed.num_tokens + num_new_tokens
    return computed, new_blocks


def step(manager: KVCacheManager, request: Request, num_new_tokens: int | None = None,
         ) -> list | None:
    """What the scheduler does for a running request."""
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - request.num_computed_tokens
    new_blocks = manager.allocate_slots(request, num_new_tokens)
    if new_blocks is not None:
        request.num_computed_tokens += num_new_tokens
    return new_blocks


def ids(blocks: list) -> list[int]:
    return [b.block_id for b in blocks]


def free_ids(manager: KVCacheManager) -> list[int]:
    return [b.block_id for b in manager.pool.free_queue]


def snapshot(manager: KVCacheManager) -> dict[str, Any]:
    pool = manager.pool
    return {
        "ref_cnt": [b.ref_cnt for b in pool.blocks],
        "block_hash": [b.block_hash for b in pool.blocks],
        "free_list": free_ids(manager),
        "num_free_blocks": pool.num_free_blocks,
        "cached_blocks": {h: b.block_id for h, b in pool.cached_blocks.items()},
        "req_to_blocks": {r: ids(bs) for r, bs in manager.req_to_blocks.items()},
        "num_cached_blocks": dict(manager.num_cached_blocks),
    }


@pytest.fixture
def manager() -> KVCacheManager:
    return KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)


# ---------------------------------------------------------------------------- allocation
def test_allocate_new_request(manager: KVCacheManager) -> None:
    request = make_request("a", list(range(10)))
    computed, new_blocks = admit(manager, request)
    assert computed.blocks == [] and computed.num_tokens == 0
    assert ids(new_blocks) == [0, 1, 2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert [b.ref_cnt for b in new_blocks] == [1, 1, 1]
    assert manager.num_free_blocks == 13
    assert manager.usage() == pytest.approx(3 / 16)
    # The two full blocks enter the prefix cache; the partial third does not.
    assert manager.num_cached_blocks["a"] == 2
    assert manager.pool.cached_blocks == {request.block_hashes[0]: new_blocks[0],
                                          request.block_hashes[1]: new_blocks[1]}
    assert new_blocks[2].block_hash is None
    manager.check_invariants()


def test_allocate_rejects_zero_tokens(manager: KVCacheManager) -> None:
    with pytest.raises(ValueError):
        manager.allocate_slots(make_request("a", [1, 2, 3]), 0)
    assert manager.req_to_blocks == {}


def test_decode_grows_across_block_boundaries(manager: KVCacheManager) -> None:
    request = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(manager, request)
    assert manager.get_block_ids("a") == [0, 1]
    assert manager.num_cached_blocks["a"] == 1

    request.append_output_token(8)  # 8 tokens: still two blocks
    assert step(manager, request) == []
    assert manager.get_block_ids("a") == [0, 1]
    assert manager.num_cached_blocks["a"] == 2  # block 1 just became full and computed
    assert manager.pool.get_cached_block(request.block_hashes[1]).block_id == 1

    request.append_output_token(9)  # 9 tokens: a third block
    assert ids(step(manager, request)) == [2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    for token in (10, 11, 12):
        request.append_output_token(token)
        assert step(manager, request) == []
    assert manager.num_cached_blocks["a"] == 3
    assert manager.num_free_blocks == 13
    manager.check_invariants()


def test_chunked_prefill_caches_only_computed_full_blocks(manager: KVCacheManager) -> None:
    request = make_request("a", list(range(14)))
    expected = [(5, [0, 1], 1), (10, [0, 1, 2], 2), (14, [0, 1, 2, 3], 3)]
    _, first = admit(manager, request, 5)
    assert ids(first) == [0, 1]
    for i, (num_computed, block_ids, num_cached) in enumerate(expected):
        if i:
            step(manager, request, min(5, request.num_tokens - request.num_computed_tokens))
        assert request.num_computed_tokens == num_computed
        assert manager.get_block_ids("a") == block_ids
        assert manager.num_cached_blocks["a"] == num_cached
        assert len(manager.pool.cached_blocks) == num_cached
        manager.check_invariants()


def test_unfinished_chunk_is_not_a_prefix_hit_beyond_what_was_computed(
        manager: KVCacheManager) -> None:
    a = make_request("a", list(range(16)))
    admit(manager, a, 6)  # tokens 0..5 computed: only block 0 is full
    b = make_request("b", list(range(16)) + [99])
    computed = manager.get_computed_blocks(b)
    assert computed.num_tokens == 4
    assert ids(computed.blocks) == [0]


def test_allocate_with_a_hit_and_a_chunk(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(16)))
    admit(manager, a)
    b = make_request("b", list(range(16)) + [50, 51, 52, 53, 54])
    computed, new_blocks = admit(manager, b, 3)  # hit 16 tokens, compute 3 more
    assert computed.num_tokens == 16
    assert ids(new_blocks) == [4]
    assert manager.get_block_ids("b") == [0, 1, 2, 3, 4]
    assert b.num_computed_tokens == 19
    assert manager.num_cached_blocks["b"] == 4
    step(manager, b, 2)
    assert manager.get_block_ids("b") == [0, 1, 2, 3, 4, 5]
    assert manager.num_cached_blocks["b"] == 5
    manager.check_invariants()


# ---------------------------------------------------------------------------- prefix hits
def test_prefix_hit_shares_blocks_between_live_requests(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(12)))
    admit(manager, a)
    b = make_request("b", list(range(8)) + [100, 101, 102])
    computed, new_blocks = admit(manager, b)
    assert computed.num_tokens == 8
    assert ids(computed.blocks) == [0, 1]
    assert ids(new_blocks) == [3]
    assert manager.get_block_ids("b") == [0, 1, 3]
    assert [manager.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert manager.num_free_blocks == 12
    manager.check_invariants()

    manager.free(a)
    assert [manager.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert free_ids(manager)[-1] == 2
    assert 0 not in free_ids(manager) and 1 not in free_ids(manager)
    manager.check_invariants()
    manager.free(b)
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)
    assert manager.num_free_blocks == 16
    manager.check_invariants()


@pytest.mark.parametrize("prompt_len", range(1, 19))
def test_hit_is_capped_to_leave_one_token_to_compute(prompt_len: int) -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    tokens = list(range(20))
    a = make_request("a", tokens)
    admit(manager, a)  # caches all five full blocks
    b = make_request("b", tokens[:prompt_len])
    computed = manager.get_computed_blocks(b)
    expected_blocks = (prompt_len - 1) // BLOCK_SIZE
    assert len(computed.blocks) == expected_blocks
    assert computed.num_tokens == expected_blocks * BLOCK_SIZE
    assert computed.num_tokens < prompt_len
    assert ids(computed.blocks) == list(range(expected_blocks))


def test_prompt_of_exact_block_multiple_hits_one_block_less(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(12)))
    admit(manager, a)
    manager.free(a)
    b = make_request("b", list(range(12)))
    computed, new_blocks = admit(manager, b)
    assert computed.num_tokens == 8
    assert ids(computed.blocks) == [0, 1]
    # The last block is recomputed into a fresh block; the cached copy stays indexed.
    assert len(new_blocks) == 1 and new_blocks[0].block_id not in (0, 1, 2)
    assert manager.pool.get_cached_block(b.block_hashes[2]).block_id == 2
    manager.check_invariants()


def test_lookup_stops_at_the_first_miss(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(12)))
    admit(manager, a)
    b = make_request("b", [0, 1, 2, 3, 9, 9, 9, 9] + list(range(8, 12)) + [7])
    # b's third block has a's tokens 8..11 but a different parent: no hit past block 0.
    computed = manager.get_computed_blocks(b)
    assert ids(computed.blocks) == [0]
    assert computed.num_tokens == 4


def test_hit_on_a_finished_request_revives_free_blocks(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(9)))
    admit(manager, a)
    manager.free(a)
    assert manager.num_free_blocks == 16
    assert free_ids(manager)[-3:] == [2, 1, 0]  # reversed: the deepest block first

    b = make_request("b", list(range(8)) + [40, 41])
    computed, new_blocks = admit(manager, b)
    assert ids(computed.blocks) == [0, 1]
    assert [manager.pool.blocks[i].ref_cnt for i in (0, 1)] == [1, 1]
    assert 0 not in free_ids(manager) and 1 not in free_ids(manager)
    assert ids(new_blocks) == [3]  # popped from the head, not block 2
    assert manager.num_free_blocks == 13
    manager.check_invariants()


def test_finished_blocks_stay_hittable_until_evicted_deepest_first() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(13))  # three full blocks + one partial
    a = make_request("a", prompt)
    admit(manager, a)
    manager.free(a)
    assert free_ids(manager) == [4, 5, 6, 7, 3, 2, 1, 0]

    def hit_blocks() -> int:
        return len(manager.get_computed_blocks(make_request("probe", prompt)).blocks)

    filler = make_request("filler", [1000 + i for i in range(16)])
    admit(manager, filler)  # blocks 4..7: nothing of a's is touched
    assert hit_blocks() == 3
    filler.append_output_token(2000)
    assert ids(step(manager, filler)) == [3]  # a's partial block: no hash to lose
    assert hit_blocks() == 3
    for expected_block, expected_hits in ((2, 2), (1, 1), (0, 0)):
        for token in range(BLOCK_SIZE):
            filler.append_output_token(3000 + token)
            new = step(manager, filler)
            if new:
                assert ids(new) == [expected_block]
        assert hit_blocks() == expected_hits
        assert manager.pool.blocks[expected_block].block_hash is None
        manager.check_invariants()


def test_least_recently_freed_request_is_evicted_first() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    a = make_request("a", [1] * 8 + [2])
    b = make_request("b", [3] * 8 + [4])
    admit(manager, a)  # blocks 0, 1, 2
    admit(manager, b)  # blocks 3, 4, 5
    manager.free(a)
    manager.free(b)
    assert free_ids(manager) == [2, 1, 0, 5, 4, 3]

    c = make_request("c", [7] * 11)
    _, new_blocks = admit(manager, c)
    assert ids(new_blocks) == [2, 1, 0]
    assert manager.get_computed_blocks(make_request("a2", [1] * 8 + [2])).num_tokens == 0
    b_hit = manager.get_computed_blocks(make_request("b2", [3] * 8 + [4]))
    assert ids(b_hit.blocks) == [3, 4]
    manager.check_invariants()


def test_free_walks_blocks_in_reverse(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(14)))
    admit(manager, a)
    manager.free(a)
    assert free_ids(manager) == list(range(4, 16)) + [3, 2, 1, 0]
    assert "a" not in manager.req_to_blocks
    assert "a" not in manager.num_cached_blocks
    manager.free(a)  # freeing twice is a no-op
    assert free_ids(manager) == list(range(4, 16)) + [3, 2, 1, 0]
    manager.check_invariants()


def test_preempted_request_hits_its_own_blocks(manager: KVCacheManager) -> None:
    request = make_request("a", list(range(6)))
    admit(manager, request)
    for token in (6, 7, 8):
        request.append_output_token(token)
        step(manager, request)
    assert manager.get_block_ids("a") == [0, 1, 2]
    request.append_output_token(9)  # sampled but not computed yet
    manager.free(request)
    request.num_computed_tokens = 0
    computed, new_blocks = admit(manager, request)
    assert ids(computed.blocks) == [0, 1]
    assert computed.num_tokens == 8
    assert request.num_computed_tokens == 10
    assert len(new_blocks) == 1
    manager.check_invariants()


# ---------------------------------------------------------------------------- failed allocation
def test_failed_allocation_for_a_new_request_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    admit(manager, a)
    manager.free(a)  # blocks 2, 1, 0 stay cached and free
    b = make_request("b", list(range(12)) + [20, 21, 22, 23, 24])
    computed = manager.get_computed_blocks(b)
    assert ids(computed.blocks) == [0, 1, 2]
    before = snapshot(manager)
    # 17 tokens need 5 blocks: 3 hits (all free, so they use up free capacity) + 2 new > 4.
    assert manager.allocate_slots(b, 5, computed) is None
    assert snapshot(manager) == before
    assert "b" not in manager.req_to_blocks
    manager.check_invariants()
    # 4 tokens fit exactly: 3 hits + 1 new.
    new_blocks = manager.allocate_slots(b, 4, computed)
    assert ids(new_blocks) == [3]
    assert manager.get_block_ids("b") == [0, 1, 2, 3]
    assert manager.num_free_blocks == 0
    manager.check_invariants()


def test_failed_allocation_for_a_running_request_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(10)))
    admit(manager, a)  # blocks 0, 1, 2
    admit(manager, b)  # hits 0, 1, takes 3
    assert manager.num_free_blocks == 1
    for token in range(10, 17):
        a.append_output_token(token)
    before = snapshot(manager)
    assert step(manager, a) is None  # 17 tokens need 5 blocks: 2 new, 1 free
    assert snapshot(manager) == before
    assert a.num_computed_tokens == 10
    manager.check_invariants()
    assert ids(step(manager, a, 3)) == [4]  # 13 tokens fit
    assert manager.get_block_ids("a") == [0, 1, 2, 4]
    assert manager.num_cached_blocks["a"] == 3
    manager.check_invariants()


def test_failed_allocation_with_a_hit_on_a_request_with_blocks_raises_cleanly(
        manager: KVCacheManager) -> None:
    a = make_request("a", list(range(9)))
    admit(manager, a)
    computed = manager.get_computed_blocks(make_request("b", list(range(9))))
    assert computed.blocks
    before = snapshot(manager)
    with pytest.raises(ValueError):
        manager.allocate_slots(a, 1, computed)
    assert snapshot(manager) == before


# ---------------------------------------------------------------------------- misc
def test_caching_disabled_never_hits() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_caching=False)
    a = make_request("a", list(range(12)))
    computed, new_blocks = admit(manager, a)
    assert computed is NO_COMPUTED_BLOCKS
    assert ids(new_blocks) == [0, 1, 2]
    b = make_request("b", list(range(12)))
    computed, new_blocks = admit(manager, b)
    assert computed.num_tokens == 0 and computed.blocks == []
    assert ids(new_blocks) == [3, 4, 5]
    manager.free(a)
    c = make_request("c", list(range(12)))
    assert manager.get_computed_blocks(c).num_tokens == 0
    assert manager.pool.cached_blocks == {}
    assert all(block.block_hash is None for block in manager.pool.blocks)
    assert manager.stats.hits == 0
    manager.check_invariants()


def test_prefix_cache_stats_count_queries_and_hits(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(10)))
    admit(manager, a)
    assert (manager.stats.queries, manager.stats.hits) == (10, 0)
    admit(manager, make_request("b", list(range(10))))
    assert (manager.stats.queries, manager.stats.hits) == (20, 8)
    admit(manager, make_request("c", [77] * 5))
    assert (manager.stats.queries, manager.stats.hits) == (25, 8)
    admit(manager, make_request("d", list(range(6))))
    assert (manager.stats.queries, manager.stats.hits) == (31, 12)


def test_reset_prefix_cache(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(9)))
    admit(manager, a)
    assert manager.reset_prefix_cache() is False
    assert len(manager.pool.cached_blocks) == 2
    manager.free(a)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_request("b", list(range(9)))).num_tokens == 0
    manager.check_invariants()


def test_get_block_ids_of_an_unknown_request(manager: KVCacheManager) -> None:
    assert manager.get_block_ids("nope") == []


def test_check_invariants_catches_a_ref_cnt_out_of_step_with_the_tables(
        manager: KVCacheManager) -> None:
    a = make_request("a", list(range(9)))
    admit(manager, a)
    manager.check_invariants()
    manager.pool.blocks[0].ref_cnt += 1
    with pytest.raises(AssertionError):
        manager.check_invariants()


def test_check_invariants_catches_a_block_twice_in_a_table(manager: KVCacheManager) -> None:
    a = make_request("a", list(range(5)))
    admit(manager, a)
    block = manager.req_to_blocks["a"][0]
    manager.req_to_blocks["a"].append(block)
    block.ref_cnt += 1
    with pytest.raises(AssertionError):
        manager.check_invariants()


def test_scheduler_admission_with_a_prefix_hit_allocates_exactly() -> None:
    """The scheduler's admission path must honour allocate_slots' contract: a request with a
    prefix hit of H tokens and a chunk of C gets cdiv(H + C, block_size) blocks, and only blocks
    full of computed tokens enter the prefix cache."""
    from server.config import SchedulerConfig
    from server.request import RequestStatus
    from server.scheduler.scheduler import Scheduler

    manager = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4), manager, max_model_len=100)
    a = make_request("a", list(range(16)))
    scheduler.add_request(a)
    for _ in range(4):
        scheduler.schedule()
    assert a.num_computed_tokens == 16
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)

    b = make_request("b", list(range(16)) + [100 + i for i in range(8)])
    scheduler.add_request(b)
    scheduler.schedule()  # hits 16 tokens, computes 4 more
    assert b.num_computed_tokens == 20
    assert manager.get_block_ids("b") == [0, 1, 2, 3, 4]
    assert manager.num_cached_blocks["b"] == 5
    manager.check_invariants()


# ---------------------------------------------------------------------------- state machine
VOCAB = st.integers(min_value=0, max_value=3)
PREFIXES = [[], [1, 2, 3, 0, 1, 2, 3, 0], [1, 2, 3, 0, 2, 2, 2, 2], [3, 3, 3, 3], [0] * 12]
MAX_TOKENS = 20
MAX_LIVE = 8


class KVCacheMachine(RuleBasedStateMachine):
    """Drives the manager as the scheduler would and keeps a shadow KV cache: each slot holds the
    token prefix whose KV was written there. Every block the prefix cache advertises must hold
    exactly the tokens its hash stands for.

    Rules that do not apply return at once: with preconditions hypothesis rejects many runs while
    only a few rules are enabled.
    """

    @initialize(num_blocks=st.integers(min_value=8, max_value=10),
                caching=st.integers(0, 3).map(bool),  # mostly with prefix caching
                prompts=st.lists(st.tuples(st.sampled_from(PREFIXES), st.lists(VOCAB, max_size=8)),
                                 min_size=2, max_size=4))
    def setup(self, num_blocks: int, caching: bool, prompts: list) -> None:
        self.manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=caching)
        self.waiting: dict[str, Request] = {}
        self.running: dict[str, Request] = {}
        self.next_id = 0
        self.shadow: dict[int, list[tuple[int, ...] | None]] = {}
        self.hash_tokens: dict[bytes, tuple[int, ...]] = {}
        for prefix, suffix in prompts:
            self.new_request(prefix, suffix)

    # -- helpers
    @staticmethod
    def pick(requests: dict[str, Request], index: int) -> Request:
        keys = sorted(requests)
        return requests[keys[index % len(keys)]]

    def new_request(self, prefix: list[int], suffix: list[int]) -> None:
        tokens = (prefix + suffix) or [0]
        request = make_request(f"r{self.next_id}", tokens)
        self.next_id += 1
        self.waiting[request.request_id] = request
        self.record_hashes(request)

    def record_hashes(self, request: Request) -> None:
        # The hashes as the manager computes them (it extends the request's list on use).
        extend_block_hashes(request.block_hashes, request.all_token_ids, BLOCK_SIZE)
        assert len(request.block_hashes) == request.num_tokens // BLOCK_SIZE
        for i, block_hash in enumerate(request.block_hashes):
            tokens = tuple(request.all_token_ids[:(i + 1) * BLOCK_SIZE])
            # A mismatch here would mean two token chains share a hash.
            assert self.hash_tokens.setdefault(block_hash, tokens) == tokens

    def write_kv(self, request: Request, start: int, end: int) -> None:
        blocks = self.manager.req_to_blocks[request.request_id]
        for t in range(start, end):
            block = blocks[t // BLOCK_SIZE]
            assert block.ref_cnt == 1, f"writing token {t} into shared {block}"
            slots = self.shadow.setdefault(block.block_id, [None] * BLOCK_SIZE)
            slots[t % BLOCK_SIZE] = tuple(request.all_token_ids[:t + 1])

    def must_fit(self, num_blocks_held: int, num_hits: int, num_free_hits: int,
                 num_tokens: int) -> bool:
        num_new = max(0, cdiv(num_tokens, BLOCK_SIZE) - num_blocks_held - num_hits)
        return num_new + num_free_hits <= self.manager.num_free_blocks

    def allocate(self, request: Request, num_new: int,
                 computed: ComputedBlocks = NO_COMPUTED_BLOCKS) -> bool:
        """allocate_slots, checked against the spec; on success the tokens are computed."""
        hits = computed.blocks
        held = len(self.manager.req_to_blocks.get(request.request_id, []))
        num_computed = request.num_computed_tokens + computed.num_tokens
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        must_fit = self.must_fit(held, len(hits), num_free_hits, num_computed + num_new)
        hit_ids = set(ids(hits))
        head = [i for i in free_ids(self.manager) if i not in hit_ids]
        before = snapshot(self.manager)

        new_blocks = self.manager.allocate_slots(request, num_new, computed)
        kind = "step" if held else "admit with free hits" if num_free_hits else (
            "admit with hits" if hits else "admit")
        event(f"{kind}: {'failed' if new_blocks is None else 'ok'}")
        if new_blocks is None:
            assert not must_fit, "allocation failed although the pool had room"
            assert snapshot(self.manager) == before, "a failed allocation changed state"
            return False
        assert must_fit, "allocation succeeded without room"
        table = self.manager.req_to_blocks[request.request_id]
        assert table[held:held + len(hits)] == hits
        assert table[held + len(hits):] == new_blocks
        assert ids(new_blocks) == head[:len(new_blocks)], "new blocks not popped from the head"
        assert len(table) == cdiv(num_computed + num_new, BLOCK_SIZE)
        self.write_kv(request, num_computed, num_computed + num_new)
        request.num_computed_tokens = num_computed + num_new
        return True

    def free_and_check_order(self, request: Request) -> None:
        table = self.manager.req_to_blocks[request.request_id]
        released = [b.block_id for b in reversed(table) if b.ref_cnt == 1]
        kept = free_ids(self.manager)
        self.manager.free(request)
        # Blocks reaching ref_cnt 0 join the tail, the request's deepest block first.
        assert free_ids(self.manager) == kept + released
        assert request.request_id not in self.manager.req_to_blocks

    # -- rules
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(VOCAB, max_size=8))
    def add_request(self, prefix: list[int], suffix: list[int]) -> None:
        if len(self.waiting) + len(self.running) < MAX_LIVE:
            self.new_request(prefix, suffix)

    @rule(index=st.integers(0, 100), chunk=st.integers(1, 12))
    def admit(self, index: int, chunk: int) -> None:
        if not self.waiting:
            return
        request = self.pick(self.waiting, index)
        assert request.num_computed_tokens == 0
        assert request.request_id not in self.manager.req_to_blocks
        computed = self.manager.get_computed_blocks(request)
        assert computed.num_tokens == len(computed.blocks) * BLOCK_SIZE < request.num_tokens
        if not self.manager.enable_caching:
            assert computed.blocks == []
        for i, block in enumerate(computed.blocks):
            assert block.block_hash == request.block_hashes[i]
            # The hit's KV must be exactly this request's prefix.
            assert self.shadow[block.block_id] == [
                tuple(request.all_token_ids[:i * BLOCK_SIZE + k + 1]) for k in range(BLOCK_SIZE)]
        num_new = min(chunk, request.num_tokens - computed.num_tokens)
        if self.allocate(request, num_new, computed):
            del self.waiting[request.request_id]
            self.running[request.request_id] = request

    @rule(index=st.integers(0, 100), chunk=st.integers(1, 12))
    def compute(self, index: int, chunk: int) -> None:
        """A prefill chunk, or the decode step of a token that could not be computed before."""
        pending = {k: r for k, r in self.running.items() if r.num_computed_tokens < r.num_tokens}
        if pending:
            request = self.pick(pending, index)
            self.allocate(request, min(chunk, request.num_tokens - request.num_computed_tokens))

    @rule(index=st.integers(0, 100), token=VOCAB)
    def decode(self, index: int, token: int) -> None:
        """Append the sampled token of a request that caught up and schedule it, or finish it at
        MAX_TOKENS."""
        done = {k: r for k, r in self.running.items() if r.num_computed_tokens == r.num_tokens}
        if not done:
            return
        request = self.pick(done, index)
        if request.num_tokens >= MAX_TOKENS:
            self.free_and_check_order(request)
            del self.running[request.request_id]
            return
        request.append_output_token(token)
        self.record_hashes(request)
        self.allocate(request, 1)

    @rule(index=st.integers(0, 100), kind=st.sampled_from(["finish", "preempt", "abort"]))
    def release(self, index: int, kind: str) -> None:
        if kind == "abort":  # a waiting request leaves: free() is a no-op
            if self.waiting:
                request = self.pick(self.waiting, index)
                before = snapshot(self.manager)
                self.manager.free(request)
                assert snapshot(self.manager) == before
                del self.waiting[request.request_id]
            return
        if not self.running:
            return
        request = self.pick(self.running, index)
        self.free_and_check_order(request)
        del self.running[request.request_id]
        if kind == "preempt":  # back to the waiting queue, recomputed from scratch
            request.num_computed_tokens = 0
            self.waiting[request.request_id] = request

    # -- invariants
    @invariant()
    def manager_invariants(self) -> None:
        self.manager.check_invariants()

    @invariant()
    def tables_match_progress(self) -> None:
        assert set(self.manager.req_to_blocks) == set(self.running)
        for request_id, request in self.running.items():
            table = self.manager.req_to_blocks[request_id]
            assert len(table) == cdiv(request.num_computed_tokens, BLOCK_SIZE)
            if self.manager.enable_caching:
                num_cached = self.manager.num_cached_blocks[request_id]
                assert num_cached == request.num_computed_tokens // BLOCK_SIZE
        distinct = {b.block_id for t in self.manager.req_to_blocks.values() for b in t}
        assert self.manager.num_free_blocks == self.manager.num_blocks - len(distinct)

    @invariant()
    def cached_blocks_hold_what_their_hash_promises(self) -> None:
        if not self.manager.enable_caching:
            assert self.manager.pool.cached_blocks == {}
            return
        for block_hash, block in self.manager.pool.cached_blocks.items():
            tokens = self.hash_tokens[block_hash]
            start = len(tokens) - BLOCK_SIZE
            assert self.shadow.get(block.block_id) == [
                tokens[:start + k + 1] for k in range(BLOCK_SIZE)], (
                f"{block} is indexed but holds other KV")


KVCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_kv_cache_state_machine = KVCacheMachine.TestCase

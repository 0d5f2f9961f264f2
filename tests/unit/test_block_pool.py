"""Unit tests for the block pool (free list, ref counts, hash map) and the block hash chain."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.kv_cache.block_hash import extend_block_hashes, hash_block_tokens
from server.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 4


def free_ids(pool_or_queue: BlockPool | FreeBlockQueue) -> list[int]:
    queue = pool_or_queue.free_queue if isinstance(pool_or_queue, BlockPool) else pool_or_queue
    return [block.block_id for block in queue]


def make_queue(num_blocks: int) -> tuple[list[KVCacheBlock], FreeBlockQueue]:
    blocks = [KVCacheBlock(i) for i in range(num_blocks)]
    return blocks, FreeBlockQueue(blocks)


# ---------------------------------------------------------------------------- FreeBlockQueue
def test_queue_starts_in_block_order() -> None:
    _, queue = make_queue(5)
    assert free_ids(queue) == [0, 1, 2, 3, 4]
    assert queue.num_free_blocks == 5


def test_queue_empty() -> None:
    queue = FreeBlockQueue([])
    assert free_ids(queue) == []
    assert queue.num_free_blocks == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_popleft_takes_the_head_and_unlinks_it() -> None:
    blocks, queue = make_queue(4)
    assert queue.popleft() is blocks[0]
    assert queue.popleft() is blocks[1]
    assert free_ids(queue) == [2, 3]
    assert queue.num_free_blocks == 2
    assert blocks[0].prev_free is None and blocks[0].next_free is None
    assert queue.popleft() is blocks[2]
    assert queue.popleft() is blocks[3]
    assert queue.num_free_blocks == 0
    with pytest.raises(IndexError):
        queue.popleft()
    assert queue.num_free_blocks == 0


@pytest.mark.parametrize("victim", [0, 2, 4])  # head, middle, tail
def test_remove_unlinks_one_block(victim: int) -> None:
    blocks, queue = make_queue(5)
    queue.remove(blocks[victim])
    expected = [i for i in range(5) if i != victim]
    assert free_ids(queue) == expected
    assert queue.num_free_blocks == 4
    assert blocks[victim].prev_free is None and blocks[victim].next_free is None
    # The list is still well formed in both directions.
    backwards = []
    block = queue._tail.prev_free
    while block is not queue._head:
        backwards.append(block.block_id)
        block = block.prev_free
    assert backwards == expected[::-1]


def test_remove_of_a_block_not_in_the_list_raises_and_changes_nothing() -> None:
    blocks, queue = make_queue(3)
    queue.remove(blocks[1])
    with pytest.raises(ValueError):
        queue.remove(blocks[1])
    assert free_ids(queue) == [0, 2]
    assert queue.num_free_blocks == 2


def test_append_goes_to_the_tail_in_call_order() -> None:
    blocks, queue = make_queue(4)
    for _ in range(4):
        queue.popleft()
    for i in (2, 0, 3):
        queue.append(blocks[i])
    assert free_ids(queue) == [2, 0, 3]
    assert queue.num_free_blocks == 3
    assert queue.popleft() is blocks[2]
    queue.append(blocks[1])
    queue.append(blocks[2])
    assert free_ids(queue) == [0, 3, 1, 2]
    assert queue.num_free_blocks == 4


def test_mixed_operations_match_a_list_model() -> None:
    blocks, queue = make_queue(8)
    model = list(range(8))
    out: list[int] = []
    ops = ["pop", "rm5", "pop", "app0", "rm3", "app5", "pop", "app1", "rm7", "app3", "pop"]
    for op in ops:
        if op == "pop":
            got = queue.popleft().block_id
            assert got == model.pop(0)
            out.append(got)
        elif op.startswith("rm"):
            i = int(op[2:])
            queue.remove(blocks[i])
            model.remove(i)
            out.append(i)
        else:
            i = int(op[3:])
            queue.append(blocks[i])
            model.append(i)
        assert free_ids(queue) == model
        assert queue.num_free_blocks == len(model)


def test_queue_operations_are_constant_time() -> None:
    # 40k removals, pops and appends on a 50k-block list: milliseconds if O(1),
    # around 5e8 pointer steps (minutes) if any of them walks the list.
    num_blocks = 50_000
    blocks, queue = make_queue(num_blocks)
    start = time.perf_counter()
    for i in range(10_000):
        block = blocks[num_blocks // 2 + i]
        queue.remove(block)
        queue.append(block)
        queue.append(queue.popleft())
    elapsed = time.perf_counter() - start
    assert queue.num_free_blocks == num_blocks
    assert elapsed < 1.0, f"40k queue operations took {elapsed:.2f}s"


# ---------------------------------------------------------------------------- BlockPool
def test_pool_rejects_empty() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(6)
    assert pool.num_free_blocks == 6
    assert free_ids(pool) == list(range(6))
    assert pool.usage() == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)
    assert pool.cached_blocks == {}
    pool.check_invariants()


def test_get_new_blocks_pops_from_the_head() -> None:
    pool = BlockPool(6)
    got = pool.get_new_blocks(4)
    assert [b.block_id for b in got] == [0, 1, 2, 3]
    assert all(b.ref_cnt == 1 for b in got)
    assert free_ids(pool) == [4, 5]
    assert pool.num_free_blocks == 2
    assert pool.usage() == pytest.approx(4 / 6)
    assert pool.get_new_blocks(0) == []
    pool.check_invariants()


def test_get_new_blocks_beyond_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert free_ids(pool) == [3]
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 0]
    pool.check_invariants()


def test_free_blocks_appends_to_the_tail_in_the_given_order() -> None:
    pool = BlockPool(8)
    got = pool.get_new_blocks(6)
    pool.free_blocks([got[3], got[1], got[4]])
    assert free_ids(pool) == [6, 7, 3, 1, 4]
    assert [b.ref_cnt for b in pool.blocks] == [1, 0, 1, 0, 0, 1, 0, 0]
    pool.check_invariants()
    # Next allocations come from the head: the blocks that were free longest.
    assert [b.block_id for b in pool.get_new_blocks(3)] == [6, 7, 3]


def test_free_blocks_of_a_shared_block_only_drops_a_reference() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert 0 not in free_ids(pool)
    pool.check_invariants()
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert free_ids(pool) == [1, 2, 3, 0]
    pool.check_invariants()


def test_touch_of_a_free_cached_block_pulls_it_out_of_the_free_list() -> None:
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(3)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(blocks[1], h)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [3, 4, 2, 1, 0]
    assert pool.get_cached_block(h) is blocks[1]  # a free block stays hittable

    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 1
    assert free_ids(pool) == [3, 4, 2, 0]
    assert pool.num_free_blocks == 4
    assert blocks[1].block_hash == h
    assert pool.get_cached_block(h) is blocks[1]
    pool.check_invariants()

    # Touching a block in use only adds a reference.
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 2
    assert free_ids(pool) == [3, 4, 2, 0]
    pool.check_invariants()


def test_popping_a_cached_free_block_evicts_its_hash() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    h1 = hash_block_tokens(h0, [5, 6, 7, 8])
    pool.cache_full_block(blocks[0], h0)
    pool.cache_full_block(blocks[1], h1)
    pool.free_blocks(reversed(blocks))  # free list: 2, 1, 0
    assert set(pool.cached_blocks) == {h0, h1}

    (b,) = pool.get_new_blocks(1)
    assert b.block_id == 2  # uncached: nothing to evict
    assert set(pool.cached_blocks) == {h0, h1}

    (b,) = pool.get_new_blocks(1)
    assert b is blocks[1]
    assert b.block_hash is None
    assert pool.get_cached_block(h1) is None
    assert pool.get_cached_block(h0) is blocks[0]
    assert b.ref_cnt == 1
    pool.check_invariants()


def test_evicting_an_unindexed_duplicate_keeps_the_indexed_block() -> None:
    pool = BlockPool(3)
    a, b, _ = pool.get_new_blocks(3)
    h = hash_block_tokens(None, [9, 9, 9, 9])
    pool.cache_full_block(a, h)
    pool.cache_full_block(b, h)  # first writer wins
    assert pool.get_cached_block(h) is a
    assert b.block_hash == h
    pool.free_blocks([b])
    assert pool.get_new_blocks(1) == [b]
    assert b.block_hash is None
    assert pool.get_cached_block(h) is a  # the duplicate's eviction leaves a's entry alone
    pool.check_invariants()


def test_cache_full_block_is_a_no_op_on_an_already_hashed_block() -> None:
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    h0 = hash_block_tokens(None, [1, 1, 1, 1])
    h1 = hash_block_tokens(None, [2, 2, 2, 2])
    pool.cache_full_block(block, h0)
    pool.cache_full_block(block, h1)
    assert block.block_hash == h0
    assert pool.cached_blocks == {h0: block}


def test_lru_order_survives_a_touch_and_refree() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    hashes = [hash_block_tokens(None, [i] * 4) for i in range(4)]
    for block, h in zip(blocks, hashes):
        pool.cache_full_block(block, h)
    pool.free_blocks(blocks)  # free list 0 1 2 3
    pool.touch([blocks[0]])
    pool.free_blocks([blocks[0]])  # 0 was used most recently: now evicted last
    assert free_ids(pool) == [1, 2, 3, 0]
    evicted = pool.get_new_blocks(2)
    assert [b.block_id for b in evicted] == [1, 2]
    assert set(pool.cached_blocks) == {hashes[3], hashes[0]}
    pool.check_invariants()


def test_reset_prefix_cache() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(blocks[0], h)
    pool.free_blocks([blocks[0]])
    assert pool.reset_prefix_cache() is False  # block 1 still in use
    assert pool.get_cached_block(h) is blocks[0]
    assert blocks[0].block_hash == h
    pool.free_blocks([blocks[1]])
    assert pool.reset_prefix_cache() is True
    assert pool.cached_blocks == {}
    assert all(b.block_hash is None for b in pool.blocks)
    pool.check_invariants()


# ---------------------------------------------------------------------------- check_invariants
def test_check_invariants_catches_a_free_block_with_a_reference() -> None:
    pool = BlockPool(4)
    pool.blocks[2].ref_cnt = 1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_an_unreferenced_block_missing_from_the_list() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    block.ref_cnt = 0  # leaked: ref_cnt 0 but not on the free list
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_a_negative_ref_cnt() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    block.ref_cnt = -1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_a_wrong_free_count() -> None:
    pool = BlockPool(4)
    pool.free_queue.num_free_blocks += 1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_a_block_twice_in_the_list() -> None:
    pool = BlockPool(4)
    pool.get_new_blocks(1)
    pool.free_queue.append(pool.blocks[2])  # already free: now listed twice
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_a_stale_hash_map_entry() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(blocks[0], h0)
    pool.check_invariants()
    pool.cached_blocks[hash_block_tokens(None, [4, 3, 2, 1])] = blocks[0]
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_an_entry_to_an_evicted_block() -> None:
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_full_block(block, h)
    block.block_hash = None  # evicted without dropping the map entry
    with pytest.raises(AssertionError):
        pool.check_invariants()


# ---------------------------------------------------------------------------- hashing
def _spec_hash(parent: bytes | None, tokens: list[int], extra: bytes = b"") -> bytes:
    """DESIGN.md §3: H(parent_hash ‖ token ids as little-endian int32 ‖ extra keys), sha256."""
    h = hashlib.sha256()
    h.update(parent if parent is not None else b"pagedserve-prefix-root")
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    if extra:
        h.update(b"\x00extra\x00" + extra)
    return h.digest()


def test_hash_follows_the_documented_formula() -> None:
    root = hash_block_tokens(None, [1, 2, 3, 70000])
    assert root == _spec_hash(None, [1, 2, 3, 70000])
    child = hash_block_tokens(root, [-1, 0, 2**31 - 1, 5])
    assert child == _spec_hash(root, [-1, 0, 2**31 - 1, 5])
    assert hash_block_tokens(root, [5, 6, 7, 8], b"lora-1") == _spec_hash(
        root, [5, 6, 7, 8], b"lora-1")
    assert isinstance(root, bytes) and len(root) == 32


def test_hash_is_stable_across_processes_and_hash_seeds() -> None:
    code = ("from server.kv_cache.block_hash import hash_block_tokens as h;"
            "p = h(None, [11, 12, 13, 14]); print(h(p, [15, 16, 17, 18], b'x').hex())")
    digests = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO_ROOT))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=REPO_ROOT)
        digests.add(out.stdout.strip())
    here = hash_block_tokens(hash_block_tokens(None, [11, 12, 13, 14]), [15, 16, 17, 18], b"x")
    assert digests == {here.hex()}


def test_hash_depends_on_every_token_position() -> None:
    tokens = [10, 20, 30, 40]
    base = hash_block_tokens(None, tokens)
    for i in range(len(tokens)):
        changed = list(tokens)
        changed[i] += 1
        assert hash_block_tokens(None, changed) != base, f"token {i} ignored"
    assert hash_block_tokens(None, tokens[::-1]) != base
    # Values that agree in their low byte but not as int32.
    assert hash_block_tokens(None, [1, 2, 3, 4]) != hash_block_tokens(None, [257, 2, 3, 4])


def test_hash_depends_on_the_parent() -> None:
    tokens = [5, 6, 7, 8]
    p1 = hash_block_tokens(None, [1, 2, 3, 4])
    p2 = hash_block_tokens(None, [1, 2, 3, 5])
    assert len({hash_block_tokens(None, tokens), hash_block_tokens(p1, tokens),
                hash_block_tokens(p2, tokens)}) == 3


def test_hash_depends_on_extra_keys() -> None:
    tokens = [5, 6, 7, 8]
    plain = hash_block_tokens(None, tokens)
    assert hash_block_tokens(None, tokens, b"") == plain
    a = hash_block_tokens(None, tokens, b"adapter-a")
    b = hash_block_tokens(None, tokens, b"adapter-b")
    assert len({plain, a, b}) == 3
    assert hash_block_tokens(None, tokens, b"adapter-a") == a  # deterministic


def test_extend_block_hashes_only_hashes_full_blocks() -> None:
    tokens = list(range(100, 111))  # 11 tokens: two full blocks of 4 and a partial one
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, BLOCK_SIZE)
    h0 = hash_block_tokens(None, tokens[0:4])
    h1 = hash_block_tokens(h0, tokens[4:8])
    assert hashes == [h0, h1]

    short: list[bytes] = []
    extend_block_hashes(short, tokens[:3], BLOCK_SIZE)
    assert short == []


def test_extend_block_hashes_is_incremental() -> None:
    tokens = list(range(1, 18))
    whole: list[bytes] = []
    extend_block_hashes(whole, tokens, BLOCK_SIZE)
    assert len(whole) == 4

    grown: list[bytes] = []
    lengths = []
    for n in range(1, len(tokens) + 1):
        before = list(grown)
        extend_block_hashes(grown, tokens[:n], BLOCK_SIZE)
        assert grown[:len(before)] == before  # existing entries are never rewritten
        lengths.append(len(grown))
    assert grown == whole
    assert lengths == [n // BLOCK_SIZE for n in range(1, len(tokens) + 1)]


def test_extend_block_hashes_does_not_rehash_existing_entries() -> None:
    # The existing entries are trusted as parents, not recomputed: a sentinel parent proves it.
    sentinel = b"\x01" * 32
    hashes = [sentinel]
    tokens = list(range(8))
    extend_block_hashes(hashes, tokens, BLOCK_SIZE)
    assert hashes == [sentinel, hash_block_tokens(sentinel, tokens[4:8])]


def test_extend_block_hashes_passes_extra_keys_to_every_block() -> None:
    tokens = list(range(8))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, BLOCK_SIZE, b"k")
    h0 = hash_block_tokens(None, tokens[:4], b"k")
    assert hashes == [h0, hash_block_tokens(h0, tokens[4:], b"k")]

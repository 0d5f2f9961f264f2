"""Per-request block tables on top of the block pool, with check-then-commit allocation."""

from __future__ import annotations

from dataclasses import dataclass

from server.kv_cache.block_hash import extend_block_hashes
from server.kv_cache.block_pool import BlockPool, KVCacheBlock, require
from server.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # tokens looked up (a resumed request includes its output so far)
    hits: int = 0  # of those, tokens found in the cache


@dataclass(slots=True)
class ComputedBlocks:
    """Opaque result of a prefix-cache lookup, handed back to `allocate_slots` unchanged."""

    blocks: list[KVCacheBlock]
    num_tokens: int


NO_COMPUTED_BLOCKS = ComputedBlocks([], 0)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of each request's leading blocks already entered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of full blocks, leaving at least one token to compute."""
        if not self.enable_caching:
            return NO_COMPUTED_BLOCKS
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_tokens = len(blocks) * self.block_size
        self.stats.queries += request.num_tokens
        self.stats.hits += num_tokens
        return ComputedBlocks(blocks, num_tokens)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: ComputedBlocks = NO_COMPUTED_BLOCKS,
    ) -> list[KVCacheBlock] | None:
        """Give `request` room for `num_new_tokens` more tokens after its computed ones (plus a
        prefix hit `computed`, only for a request that holds no blocks yet).

        Returns the newly allocated blocks, or None, leaving every structure unchanged, when the
        pool cannot supply them.
        """
        if num_new_tokens < 1:
            raise ValueError("num_new_tokens must be >= 1")
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        if computed.blocks and req_blocks:
            raise ValueError("a prefix hit can only be added to a request without blocks")
        num_total = request.num_computed_tokens + computed.num_tokens + num_new_tokens
        num_required = cdiv(num_total, self.block_size)
        num_new_blocks = max(0, num_required - len(req_blocks) - len(computed.blocks))
        # Hits on free blocks leave the free list when touched, so they use up free capacity.
        num_free_hits = sum(1 for b in computed.blocks if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.pool.num_free_blocks:
            return None

        # Commit.
        if computed.blocks:
            self.pool.touch(computed.blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        req_blocks = self.req_to_blocks.setdefault(request.request_id, req_blocks)
        req_blocks.extend(computed.blocks)
        req_blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, req_blocks, min(num_total, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(
        self, request: Request, req_blocks: list[KVCacheBlock], num_tokens: int
    ) -> None:
        start = self.num_cached_blocks.get(request.request_id, 0)
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(start, end):
            self.pool.cache_full_block(req_blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Release the request's blocks, deepest first so that chain tails are evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            require(len({b.block_id for b in blocks}) == len(blocks), "block twice in one table")
            for block in blocks:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            held = refs.get(block.block_id, 0)
            require(block.ref_cnt == held,
                    f"{block}: ref_cnt != number of requests holding it ({held})")

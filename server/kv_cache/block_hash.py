"""Stable block hashes for prefix caching.

H(parent_hash ‖ token ids as little-endian int32 ‖ extra keys), sha256: never Python's hash().
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes

_ROOT = b"pagedserve-prefix-root"


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: bytes = b""
) -> BlockHash:
    h = hashlib.sha256()
    h.update(parent_hash if parent_hash is not None else _ROOT)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if extra_keys:
        h.update(b"\x00extra\x00")
        h.update(extra_keys)
    return h.digest()


def extend_block_hashes(
    block_hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
    extra_keys: bytes = b"",
) -> None:
    """Append the hashes of every block of `token_ids` that became full since the last call."""
    num_full = len(token_ids) // block_size
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full):
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size],
                                   extra_keys)
        block_hashes.append(parent)

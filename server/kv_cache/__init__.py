"""Paged KV-cache bookkeeping: block pool, block hashes, per-request manager. Pure Python."""

"""Keep glibc malloc from handing large activation buffers back to the kernel between ops.

A forward pass allocates and frees the same multi-megabyte activations every layer. With glibc's
defaults those come from fresh mmap()s, or from a heap top that is trimmed after each free, so
every layer page-faults its buffers in again: ~250k minor faults per 2048-token prefill forward
on SmolLM2-135M (2.6 s; 2.4 s without them). Raising the mmap threshold to its maximum and the
trim threshold far above it keeps the pages mapped and reused (0 faults). README "Benchmarks and
performance" has the end-to-end A/B command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 1 << 30

_tuned = False


def keep_freed_memory_mapped() -> bool:
    """Applies the thresholds once per process; False where libc has no mallopt (not glibc)."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        logger.debug("no mallopt in this libc; malloc thresholds left as they are")
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                  and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _tuned

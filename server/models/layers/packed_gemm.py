"""fp32 GEMMs on CPU from a prepacked copy of the weight (the unquantized LinearMethod's CPU path).

torch's CPU `F.linear` hands MKL the plain [out, in] weight, which MKL repacks on every call: for
the few-row GEMMs of a decode step (4-128 rows) that repacking costs more than the arithmetic.
Packing once, after loading, is faster (measured in docs/performance.md). Two packers, the
first that works on this torch build:

- MKL's packed GEMM (`torch.ops.mkl._mkl_linear`). torch asks for the packing batch size to equal
  the GEMM's rows; MKL's packed layout does not depend on it (same size, same results for every
  row count we tried), so one copy serves every batch, and each weight's copy is checked against
  F.linear at several row counts before it is used.
- oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`), slower than MKL's at 16+ rows.

For 1-3 rows MKL's GEMV on the plain weight is faster, so those keep it; the packed copy costs a
second copy of every linear weight in memory, hence the runner's budget
(layers/linear.py's `pack_linear_weights`).

With the compiled CPU kernels (`small=True`), a third copy in kernels/cpu_linear.py's layout
serves the row counts where it is faster than the path above, measured on this machine for each
weight shape (`own_rows_limit`): on 2 Sapphire Rapids cores over SmolLM2-135M it took 0.95x
MKL's time at 1 row, 0.69-0.80x at 4-16, 0.88x at 32 and 1.03x at 64; on 2 Zen 2 cores (AVX2)
0.4-0.7x at 1-64 rows.
PAGEDSERVE_SMALL_GEMM_ROWS=R skips the measurement and serves 1-R rows from the copy (0: none).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_linear

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 4  # measured crossover on 2 Sapphire Rapids cores, docs/performance.md
SMALL_ROWS = (1, 64)  # the most rows the cpu_linear copy may serve; per shape, as measured
_LADDER = (1, 2, 4, 8, 16, 32, 64)  # row counts timed for the limit
_MKL_PACK_ROWS = 64  # the batch-size hint given to MKL's packer (the layout ignores it)
_PROBE_ROWS = (PACKED_MIN_ROWS, 7, 64, 200)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    kind: str  # "mkl" or "onednn"
    tensor: torch.Tensor
    small: torch.Tensor | None = None  # cpu_linear.pack(weight), for 1..small_max_rows rows
    small_max_rows: int = 0


def _run_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: PackedWeight) -> torch.Tensor:
    if packed.kind == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed.tensor, weight, bias, x.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [], "")


def _agrees(packed: PackedWeight, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    gen = torch.Generator().manual_seed(0)
    for rows in _PROBE_ROWS:
        probe = torch.randn(rows, weight.shape[1], generator=gen)
        if not torch.allclose(_run_packed(probe, weight, bias, packed),
                              F.linear(probe, weight, bias), rtol=1e-4, atol=1e-4):
            return False
    return True


def row_limit(own_is_faster: Callable[[int], bool], ladder: tuple[int, ...] = _LADDER) -> int:
    """The largest row count of `ladder` up to which the own GEMM wins at every count (0: it
    loses at the first)."""
    limit = 0
    for rows in ladder:
        if not own_is_faster(rows):
            break
        limit = rows
    return limit


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds `fn` takes, the median of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_STREAM_BYTES = 32 << 20  # weights timed per shape: more than the caches hold, as in a forward


@functools.cache
def own_rows_limit(in_features: int, out_features: int) -> int:
    """Up to how many rows the cpu_linear copy beats the packed or plain torch GEMM for a
    weight of this shape, timed once per shape on this machine (or PAGEDSERVE_SMALL_GEMM_ROWS).
    The calls cycle through copies of the weight that together outgrow the caches, so the
    weights stream from memory as a decode step's do."""
    forced = os.environ.get("PAGEDSERVE_SMALL_GEMM_ROWS")
    if forced is not None:
        return max(0, min(int(forced), SMALL_ROWS[1]))
    gen = torch.Generator().manual_seed(2)
    copies = max(1, min(16, _STREAM_BYTES // (4 * in_features * out_features)))
    weights = [torch.randn(out_features, in_features, generator=gen) for _ in range(copies)]
    own = [cpu_linear.pack(w) for w in weights]
    packed = [packed_weight(w) for w in weights]

    def own_is_faster(rows: int) -> bool:
        x = torch.randn(rows, in_features, generator=gen)
        turn = iter(range(1 << 30))

        def theirs() -> None:
            i = next(turn) % copies
            linear(x, weights[i], None, packed[i])

        def ours() -> None:
            cpu_linear.linear(x, own[next(turn) % copies], None, out_features)

        return median_time(ours, 2 * copies) <= median_time(theirs, 2 * copies)

    return row_limit(own_is_faster)


def _small_copy(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """cpu_linear's copy of `weight`, checked against F.linear at a few row counts."""
    small = cpu_linear.pack(weight)
    gen = torch.Generator().manual_seed(1)
    for rows in (SMALL_ROWS[0], 7, SMALL_ROWS[1]):
        probe = torch.randn(rows, weight.shape[1], generator=gen)
        if not torch.allclose(cpu_linear.linear(probe, small, bias, weight.shape[0]),
                              F.linear(probe, weight, bias), rtol=1e-4, atol=1e-4):
            logger.warning("the compiled small-row GEMM disagrees with F.linear; not using it")
            return None
    return small


def packed_weight(weight: torch.Tensor, bias: torch.Tensor | None = None,
                  small: bool = False) -> PackedWeight | None:
    """A prepacked copy of an fp32 CPU weight [out, in], checked against F.linear; None where
    this torch build has no packer that agrees. `small`: also the copy for the small rows,
    where the compiled kernel is available."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    packers = (("mkl", lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight, _MKL_PACK_ROWS)),
               ("onednn", lambda: torch.ops.mkldnn._reorder_linear_weight(weight, None)))
    for kind, pack in packers:
        try:
            packed = PackedWeight(kind, pack())
            if _agrees(packed, weight, bias):
                limit = (own_rows_limit(weight.shape[1], weight.shape[0])
                         if small and cpu_linear.available() else 0)
                if limit:
                    copy = _small_copy(weight, bias)
                    packed = PackedWeight(kind, packed.tensor, copy,
                                          limit if copy is not None else 0)
                return packed
        except (AttributeError, RuntimeError) as e:  # no such op in this build
            logger.debug("no %s packed linear in this torch: %s", kind, e)
            continue
        logger.warning("the %s packed linear disagrees with F.linear; not using it", kind)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    """F.linear over a [rows, in] input, from `packed` when it is set and rows are many enough."""
    if packed is not None and x.dim() == 2:
        rows = x.shape[0]
        if packed.small is not None and rows <= packed.small_max_rows and x.stride(1) == 1:
            return cpu_linear.linear(x, packed.small, bias, weight.shape[0])
        if rows >= PACKED_MIN_ROWS:
            return _run_packed(x, weight, bias, packed)
    return F.linear(x, weight, bias)

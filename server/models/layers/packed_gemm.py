"""CPU GEMMs of the unquantized LinearMethod: copies of a weight made once after loading, and the
GEMM each row count runs on, chosen by measurement (layers/gemm_choice.py).

torch's CPU `F.linear` hands its library the plain [out, in] weight, which it repacks on every
call; for the few-row GEMMs of a decode step that repacking costs more than the arithmetic.
The copies, each checked against F.linear before use:

- "own": kernels/cpu_linear.py's layout for the compiled tiles (fp32, and bf16 with fp32
  sums), which the compiled decode step also reads;
- "mkl": MKL's packed GEMM (`torch.ops.mkl._mkl_linear`, fp32). torch asks for the packing batch
  size to equal the GEMM's rows; MKL's packed layout does not depend on it (same size, same
  results for every row count we tried), so one copy serves every batch;
- "onednn": oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`, fp32 and bf16);
- "torch": no copy, F.linear.

`GemmPolicy` says what may be chosen: `--cpu-gemm auto` measures, a kind forces it for every
row count where it exists. PAGEDSERVE_SMALL_GEMM_ROWS=R skips the measurement (the tests set
it, so that which path runs does not depend on the machine's speed): own for 1-R rows, then
F.linear below PACKED_MIN_ROWS and the first library copy that packs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve_kernels import cpu_linear, native
from server.models.layers.gemm_choice import (
    KINDS,
    LIBRARIES,
    NEVER,
    OWN_TILES,
    GemmTable,
    TableCache,
    bucket_bounds,
    choose,
)

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 4  # unmeasured tables: F.linear's GEMV below this (Sapphire Rapids)
_MKL_PACK_ROWS = 64  # the batch-size hint given to MKL's packer (the layout ignores it)
_PROBE_ROWS = (1, 7, 65)  # a full, a partial and a tail tile of rows
_STREAM_BYTES = 32 << 20  # weights timed per shape: more than the caches hold, as in a forward


@dataclass(frozen=True)
class GemmPolicy:
    """What `packed_weight` may choose from. forced: "auto" (measure) or one of KINDS; own:
    the compiled kernels may run; max_rows: the most rows a GEMM gets (the step's budget)."""
    forced: str = "auto"
    own: bool = False
    max_rows: int = 512

    @property
    def bounds(self) -> tuple[int, ...]:
        return bucket_bounds(self.max_rows)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    table: GemmTable  # which copy each row count runs on
    shape: tuple[int, int]  # the weight's [out, in]
    library: str | None = None  # "mkl" or "onednn": the kind of `packed`
    packed: torch.Tensor | None = None
    own: torch.Tensor | None = None  # cpu_linear.pack(weight)

    @property
    def own_rows(self) -> int:
        """Rows 1..own_rows all run on the own copy (the compiled decode step's rows when
        nothing is measured)."""
        return self.table.own_rows if self.own is not None else 0


def _pack(kind: str, weight: torch.Tensor) -> torch.Tensor:
    if kind in ("own", OWN_TILES):
        if not (cpu_linear.supports(weight.dtype) and cpu_linear.available()):
            raise RuntimeError(f"the compiled GEMM is not built here or takes no {weight.dtype}")
        return cpu_linear.pack(weight)
    if kind == "mkl":
        if weight.dtype != torch.float32:
            raise RuntimeError("MKL's packed GEMM is fp32 only")
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, _MKL_PACK_ROWS)
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _run(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         copy: torch.Tensor | None, amx_min_rows: int = 1) -> torch.Tensor:
    if kind in ("own", OWN_TILES):
        assert copy is not None
        return cpu_linear.linear(x, copy, bias, weight.shape[0],
                                 NEVER if kind == OWN_TILES else amx_min_rows)
    if kind == "mkl":
        return torch.ops.mkl._mkl_linear(x, copy, weight, bias, x.shape[0])
    if kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, copy, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2  # half dtypes: an ulp of rounding apart


def _agrees(kind: str, copy: torch.Tensor | None, weight: torch.Tensor,
            bias: torch.Tensor | None) -> bool:
    gen = torch.Generator().manual_seed(0)
    tol = _tolerance(weight.dtype)
    for rows in _PROBE_ROWS:
        probe = torch.randn(rows, weight.shape[1], generator=gen).to(weight.dtype)
        if not torch.allclose(_run(kind, probe, weight, bias, copy),
                              F.linear(probe, weight, bias), rtol=tol, atol=tol):
            return False
    return True


def candidates(dtype: torch.dtype, policy: GemmPolicy) -> list[str]:
    """The kinds that may be built for this dtype: own where its kernel runs, both libraries
    (whether this torch has them shows when packing), torch always. Where the own bf16 GEMM
    runs on AMX, OWN_TILES is timed too (gemm_choice.choose)."""
    own = policy.own and cpu_linear.supports(dtype) and cpu_linear.available()
    kinds = [k for k in KINDS if k != "own" or own]
    if own and dtype == torch.bfloat16 and cpu_linear.amx():
        kinds.append(OWN_TILES)
    return kinds


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds `fn` takes, the median of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_PASSES = 3  # timed sweeps per kind and bucket, interleaved across the kinds; the best counts


def measure(in_features: int, out_features: int, dtype: torch.dtype, kinds: list[str],
            bounds: tuple[int, ...]) -> dict[str, list[float]]:
    """Seconds per call of each kind that packs, at each bucket's row count. A sweep calls a
    kind once on each of several copies of a random weight that together outgrow the caches,
    so the weights stream from memory as a forward pass's do; the kinds' sweeps alternate and
    each keeps its fastest (other load only slows a sweep down: medians of single calls
    flipped the choice between runs by 10-40%)."""
    gen = torch.Generator().manual_seed(2)
    size = torch.empty((), dtype=dtype).element_size()
    copies = max(1, min(16, _STREAM_BYTES // (size * in_features * out_features)))
    weights = [torch.randn(out_features, in_features, generator=gen).to(dtype)
               for _ in range(copies)]
    made: dict[str, list[torch.Tensor | None]] = {}
    for kind in kinds:
        try:
            made[kind] = [None if kind == "torch" else _pack(kind, w) for w in weights]
        except (AttributeError, RuntimeError) as e:  # not in this torch build, or this dtype
            logger.debug("no %s GEMM for %s: %s", kind, dtype, e)
    seconds: dict[str, list[float]] = {kind: [] for kind in made}
    for rows in bounds:
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        best = dict.fromkeys(made, float("inf"))
        for _ in range(_PASSES):
            for kind, packed in made.items():
                _run(kind, x, weights[0], None, packed[0])  # the other runtime's threads wake
                start = time.perf_counter()
                for weight, copy in zip(weights, packed, strict=True):
                    _run(kind, x, weight, None, copy)
                best[kind] = min(best[kind], (time.perf_counter() - start) / copies)
        for kind in made:
            seconds[kind].append(best[kind])
    return seconds


def _unmeasured_table(policy: GemmPolicy, own_rows: int, dtype: torch.dtype) -> GemmTable:
    """PAGEDSERVE_SMALL_GEMM_ROWS: own up to `own_rows`, then torch below PACKED_MIN_ROWS, then
    the first library that packs this dtype."""
    library = "mkl" if dtype == torch.float32 else "onednn"
    own = "own" in candidates(dtype, policy)
    return GemmTable(policy.bounds, tuple(
        "own" if own and b <= own_rows else "torch" if b < PACKED_MIN_ROWS else library
        for b in policy.bounds))


def unmeasured() -> bool:
    """PAGEDSERVE_SMALL_GEMM_ROWS is set: the tables (and the compiled decode step's rows) are
    fixed by it and nothing is timed (the tests, on any machine)."""
    return os.environ.get("PAGEDSERVE_SMALL_GEMM_ROWS") is not None


@functools.cache
def gemm_table(in_features: int, out_features: int, dtype: torch.dtype,
               policy: GemmPolicy) -> GemmTable:
    """The kinds a weight of this shape runs on per row count: forced, or measured on this
    machine (once per process, and cached on disk across starts)."""
    if policy.forced != "auto":
        return GemmTable.uniform(policy.forced, policy.bounds)
    forced_rows = os.environ.get("PAGEDSERVE_SMALL_GEMM_ROWS")
    if forced_rows is not None:
        return _unmeasured_table(policy, int(forced_rows), dtype)
    kinds = candidates(dtype, policy)
    key = json.dumps([native.cpu_signature(), torch.__version__, torch.get_num_threads(),
                      native.build_key("gemm_cpu") if "own" in kinds else None, str(dtype),
                      in_features, out_features, policy.bounds])
    cache = TableCache(native.cache_dir() / "gemm-choice.json")
    table = cache.get(key, policy.bounds)
    if table is None:
        table = choose(measure(in_features, out_features, dtype, kinds, policy.bounds),
                       policy.bounds)
        cache.put(key, table)
    return table


def packed_weight(weight: torch.Tensor, bias: torch.Tensor | None = None,
                  policy: GemmPolicy | None = None) -> PackedWeight | None:
    """The copies of a CPU weight [out, in] that its table uses, each checked against F.linear
    (a kind that disagrees is replaced by torch's, with a warning); None where every row count
    runs on F.linear."""
    policy = policy or GemmPolicy()
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    table = gemm_table(weight.shape[1], weight.shape[0], weight.dtype, policy)
    copies: dict[str, torch.Tensor] = {}
    for kind in dict.fromkeys(table.kinds):
        if kind == "torch":
            continue
        try:
            copy = _pack(kind, weight)
        except (AttributeError, RuntimeError) as e:
            if policy.forced == kind:
                raise ValueError(f"cpu_gemm {kind!r}: {e}") from e
            logger.debug("no %s GEMM here: %s", kind, e)
            table = table.replace(kind, "torch")
            continue
        if not _agrees(kind, copy, weight, bias):
            logger.warning("the %s GEMM disagrees with F.linear; not using it", kind)
            table = table.replace(kind, "torch")
            continue
        copies[kind] = copy
    if not copies:
        return None
    library = next((k for k in LIBRARIES if k in copies), None)
    return PackedWeight(table, (weight.shape[0], weight.shape[1]), library,
                        copies.get(library) if library else None, copies.get("own"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    """F.linear over a [rows, in] input, on the copy its row count's table entry names."""
    if packed is not None and x.dim() == 2:
        kind = packed.table.kind(x.shape[0])
        if kind == "own" and packed.own is not None and x.stride(1) == 1:
            return cpu_linear.linear(x, packed.own, bias, weight.shape[0],
                                     packed.table.amx_min_rows)
        if kind == packed.library:
            return _run(kind, x, weight, bias, packed.packed)
    return F.linear(x, weight, bias)

"""Which CPU GEMM serves each row count of a weight shape: a table chosen from measured times,
and its cache on disk.

The candidates (layers/packed_gemm.py makes and runs them) are "own" (kernels/cpu_linear.py's
tiles), "onednn" and "mkl" (torch's prepacked linears) and "torch" (plain F.linear on the
checkpoint's weight, no copy). They rank differently per CPU: on 2 Zen 5 cores oneDNN runs
2-2.5x MKL's rate from 4 rows up, while on Sapphire Rapids MKL led oneDNN from 16 rows
(docs/performance.md). So nothing is assumed: every candidate is timed at row buckets 1, 2,
4, ... up to the step's token budget, and each bucket takes the fastest (the own GEMM within
OWN_MARGIN of it). Only one library
copy is kept per weight (memory: own + one library copy at most), the library whose times,
relative to each bucket's best, sum least.

A table is measured once per CPU, thread count, torch version, own-kernel build, dtype and
shape, and kept in the kernel cache directory (kernels/native.py), so later starts read it.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("own", "onednn", "mkl", "torch")
# The own GEMM keeps a bucket unless another kind is this much faster: it is what the compiled
# decode step runs (which saves the layer-by-layer dispatch that a GEMM's timing does not
# see), and timings of the close pairs vary by ~10% between runs.
OWN_MARGIN = 0.10
LIBRARIES = ("mkl", "onednn")  # the prepacked copies: one of them is kept per weight
# The own bf16 GEMM timed on the AVX512_BF16 tiles alone, next to "own" on AMX tiles where the
# CPU has them: AMX pays a tile configuration and a 16-row tile per pass, so the vector tiles
# can win at the fewest rows (docs/performance.md). Not a kind of its own: it decides
# GemmTable.amx_min_rows.
OWN_TILES = "own_tiles"
NEVER = 1 << 30  # amx_min_rows where AMX won at no row count


def bucket_bounds(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two >= max_rows."""
    bounds = [1]
    while bounds[-1] < max_rows:
        bounds.append(bounds[-1] * 2)
    return tuple(bounds)


@dataclass(frozen=True)
class GemmTable:
    """Bucket i serves the row counts (bounds[i - 1], bounds[i]] with kinds[i]; row counts past
    the last bound take the last kind. The own copy runs on AMX tiles from amx_min_rows rows
    (bf16, where the CPU has AMX; 1: always)."""
    bounds: tuple[int, ...]
    kinds: tuple[str, ...]
    amx_min_rows: int = 1

    def __post_init__(self) -> None:
        assert self.bounds and len(self.bounds) == len(self.kinds), self
        assert all(k in KINDS for k in self.kinds), self.kinds
        assert self.amx_min_rows >= 1, self.amx_min_rows

    @classmethod
    def uniform(cls, kind: str, bounds: tuple[int, ...]) -> GemmTable:
        return cls(bounds, (kind,) * len(bounds))

    def kind(self, rows: int) -> str:
        return self.kinds[min(bisect.bisect_left(self.bounds, rows), len(self.kinds) - 1)]

    @property
    def own_rows(self) -> int:
        """Rows 1..own_rows all take the own GEMM (0: not even 1 row)."""
        limit = 0
        for bound, kind in zip(self.bounds, self.kinds, strict=True):
            if kind != "own":
                break
            limit = bound
        return limit

    def replace(self, kind: str, by: str) -> GemmTable:
        return GemmTable(self.bounds, tuple(by if k == kind else k for k in self.kinds),
                         self.amx_min_rows)

    def describe(self) -> str:
        """'own 1-64, onednn 65+': the row ranges of each run of one kind, and where the own
        copy's AMX threshold was measured, '(own on AMX from 5 rows)'."""
        parts, lo = [], 1
        for i, kind in enumerate(self.kinds):
            if i + 1 < len(self.kinds) and self.kinds[i + 1] == kind:
                continue
            last = i + 1 == len(self.kinds)
            hi = self.bounds[i]
            parts.append(f"{kind} {lo}+" if last else
                         f"{kind} {lo}" if lo == hi else f"{kind} {lo}-{hi}")
            lo = hi + 1
        text = ", ".join(parts)
        if self.amx_min_rows == 1 or "own" not in self.kinds:
            return text
        return text + (" (own never on AMX)" if self.amx_min_rows == NEVER
                       else f" (own on AMX from {self.amx_min_rows} rows)")


def amx_min_rows(amx: Sequence[float], tiles: Sequence[float], bounds: tuple[int, ...]) -> int:
    """The first row count of the run of buckets, up to the last, where the own GEMM on AMX
    was at least as fast as on the vector tiles; NEVER when it lost at the last bucket."""
    start = len(bounds)
    while start > 0 and amx[start - 1] <= tiles[start - 1]:
        start -= 1
    if start == len(bounds):
        return NEVER
    return 1 if start == 0 else bounds[start - 1] + 1


def choose(seconds: Mapping[str, Sequence[float]], bounds: tuple[int, ...]) -> GemmTable:
    """The table from each candidate's time per bucket (`seconds[kind][i]` at bounds[i]); with
    OWN_TILES timed too, "own" runs on AMX from `amx_min_rows` and counts at the better
    of its two times."""
    assert seconds and all(len(t) == len(bounds) for t in seconds.values()), seconds
    seconds = dict(seconds)
    amx_from = 1
    tiles = seconds.pop(OWN_TILES, None)
    if tiles is not None:
        amx = seconds["own"]
        amx_from = amx_min_rows(amx, tiles, bounds)
        seconds["own"] = [t if bound >= amx_from else v
                          for bound, t, v in zip(bounds, amx, tiles, strict=True)]
    best = [min(t[i] for t in seconds.values()) for i in range(len(bounds))]
    libraries = [k for k in LIBRARIES if k in seconds]
    kept = min(libraries, key=lambda k: sum(t / b for t, b in zip(seconds[k], best,
                                                                 strict=True)),
               default=None)
    allowed = [k for k in ("own", kept, "torch") if k is not None and k in seconds]

    def cost(kind: str, i: int) -> float:
        return seconds[kind][i] / (1 + OWN_MARGIN) if kind == "own" else seconds[kind][i]

    return GemmTable(bounds, tuple(min(allowed, key=lambda k: cost(k, i))
                                   for i in range(len(bounds))), amx_from)


class TableCache:
    """Measured choices on disk, one JSON object of key -> value (a table's kinds; the compiled
    decode step's rows); a file that cannot be read counts as empty, and a failed write only
    costs the next start its measurement."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def value(self, key: str) -> object:
        return self._read().get(key)

    def store(self, key: str, value: object) -> None:
        data = self._read()
        data[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(suffix=".json", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # readers never see half a file
        except OSError as e:
            logger.warning("could not store a measured choice in %s: %s", self.path, e)

    def get(self, key: str, bounds: tuple[int, ...]) -> GemmTable | None:
        value = self.value(key)
        if not isinstance(value, dict):
            return None
        kinds, amx_from = value.get("kinds"), value.get("amx_min_rows")
        if (not isinstance(kinds, list) or len(kinds) != len(bounds)
                or not all(k in KINDS for k in kinds)
                or not isinstance(amx_from, int) or amx_from < 1):
            return None
        return GemmTable(bounds, tuple(kinds), amx_from)

    def put(self, key: str, table: GemmTable) -> None:
        self.store(key, {"kinds": list(table.kinds), "amx_min_rows": table.amx_min_rows})

"""Which CPU GEMM serves a row count: the table chosen from times, its disk cache, the forced
kinds, and a real (tiny) measurement. Timings here are synthetic wherever a choice is checked,
so nothing depends on this machine's speed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.models.layers import packed_gemm
from server.models.layers.gemm_choice import (
    NEVER,
    OWN_MARGIN,
    OWN_TILES,
    GemmTable,
    TableCache,
    amx_min_rows,
    bucket_bounds,
    choose,
)
from server.models.layers.linear import Linear
from server.models.layers.packed_gemm import GemmPolicy


def test_buckets_are_powers_of_two_up_to_the_budget():
    assert bucket_bounds(1) == (1,)
    assert bucket_bounds(512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert bucket_bounds(100) == (1, 2, 4, 8, 16, 32, 64, 128)


def test_a_row_count_takes_its_bucket_or_the_last():
    table = GemmTable((1, 2, 4, 8), ("torch", "own", "own", "onednn"))
    assert [table.kind(r) for r in (1, 2, 3, 4, 5, 8, 9, 1000)] == [
        "torch", "own", "own", "own", "onednn", "onednn", "onednn", "onednn"]
    assert table.own_rows == 0  # 1 row is torch's
    assert GemmTable((1, 2, 4), ("own", "own", "mkl")).own_rows == 2
    assert table.describe() == "torch 1, own 2-4, onednn 5+"
    assert GemmTable.uniform("own", (1, 2)).describe() == "own 1+"


def test_each_bucket_takes_the_fastest_and_one_library_is_kept():
    bounds = (1, 2, 4, 8)
    seconds = {"own": [1.0, 2.0, 4.0, 9.0], "torch": [0.9, 3.0, 6.0, 12.0],
               "mkl": [2.0, 2.5, 4.5, 8.5], "onednn": [2.0, 2.2, 3.0, 8.0]}
    # oneDNN is kept (its times over the best sum least); MKL's never runs.
    assert choose(seconds, bounds).kinds == ("torch", "own", "onednn", "onednn")
    # The own GEMM keeps a bucket within OWN_MARGIN (it is the compiled step's GEMM).
    assert choose({"own": [1.05], "torch": [1.0]}, (1,)).kinds == ("own",)
    assert choose({"own": [1.0 + 2 * OWN_MARGIN], "torch": [1.0]}, (1,)).kinds == ("torch",)
    # A tie goes to the own GEMM; without libraries only own and torch are left.
    assert choose({"own": [1.0] * 4, "torch": [1.0, 1.0, 0.5, 1.0]}, bounds).kinds == (
        "own", "own", "torch", "own")


def test_amx_takes_the_rows_from_where_it_wins_up_to_the_last_bucket():
    bounds = (1, 2, 4, 8, 16)
    assert amx_min_rows([1.0] * 5, [2.0] * 5, bounds) == 1
    assert amx_min_rows([3.0, 3.0, 3.0, 3.0, 3.0], [2.0, 2.5, 3.0, 4.0, 8.0], bounds) == 3
    # A win at 2 rows that a loss at 4 interrupts does not count.
    assert amx_min_rows([1.0, 1.0, 5.0, 1.0, 1.0], [2.0] * 5, bounds) == 5
    assert amx_min_rows([1.0, 1.0, 1.0, 1.0, 3.0], [2.0] * 5, bounds) == NEVER


def test_the_own_kind_counts_at_its_better_tiles_and_keeps_the_threshold():
    bounds = (1, 2, 4, 8)
    seconds = {"own": [2.0, 2.0, 2.0, 2.0], OWN_TILES: [1.0, 1.5, 3.0, 6.0],
               "onednn": [1.2, 1.8, 2.5, 2.5], "torch": [9.0] * 4}
    table = choose(seconds, bounds)
    assert table.amx_min_rows == 3
    assert table.kinds == ("own", "own", "own", "own")  # tiles at 1-2 beat oneDNN
    assert table.describe() == "own 1+ (own on AMX from 3 rows)"
    assert choose({"own": [1.0], "torch": [1.5]}, (1,)).amx_min_rows == 1  # not timed: always
    never = choose({"own": [2.0], OWN_TILES: [1.0], "torch": [9.0]}, (1,))
    assert never.describe() == "own 1+ (own never on AMX)"
    assert never.replace("own", "torch").amx_min_rows == NEVER


def test_tables_survive_on_disk_and_bad_files_count_as_empty(tmp_path):
    cache = TableCache(tmp_path / "sub" / "choice.json")
    bounds = (1, 2)
    assert cache.get("k", bounds) is None
    cache.put("k", GemmTable(bounds, ("own", "mkl")))
    cache.put("j", GemmTable(bounds, ("torch", "torch")))
    assert TableCache(cache.path).get("k", bounds) == GemmTable(bounds, ("own", "mkl"))
    cache.put("a", GemmTable(bounds, ("own", "own"), amx_min_rows=2))
    assert cache.get("a", bounds) == GemmTable(bounds, ("own", "own"), amx_min_rows=2)
    assert cache.get("k", (1, 2, 4)) is None  # other buckets: measured again
    cache.path.write_text("{not json")
    assert cache.get("k", bounds) is None
    cache.path.write_text('{"k": ["own", "fast"]}')
    assert cache.get("k", bounds) is None


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """gemm_table measures (no PAGEDSERVE_SMALL_GEMM_ROWS) into a fresh cache directory, with
    `measure` replaced by synthetic times; returns the list of shapes measured."""
    monkeypatch.delenv("PAGEDSERVE_SMALL_GEMM_ROWS", raising=False)
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path))
    calls = []

    def fake(in_features, out_features, dtype, kinds, bounds):
        calls.append((in_features, out_features))
        fast = "onednn" if "onednn" in kinds else "torch"
        return {k: [1.0 if k == fast else 2.0] * len(bounds) for k in kinds}

    monkeypatch.setattr(packed_gemm, "measure", fake)
    packed_gemm.gemm_table.cache_clear()
    yield calls
    packed_gemm.gemm_table.cache_clear()


def test_a_shape_is_measured_once_and_then_read_from_disk(measured, monkeypatch):
    policy = GemmPolicy(max_rows=8)
    table = packed_gemm.gemm_table(32, 48, torch.float32, policy)
    assert table.kinds == ("onednn",) * 4
    packed_gemm.gemm_table(32, 48, torch.float32, policy)  # this process: remembered
    packed_gemm.gemm_table.cache_clear()  # a new start: from disk
    assert packed_gemm.gemm_table(32, 48, torch.float32, policy) == table
    packed_gemm.gemm_table(32, 64, torch.float32, policy)
    assert measured == [(32, 48), (32, 64)]


def test_the_chosen_library_runs_the_rows(measured, monkeypatch):
    layer = Linear(32, 48, bias=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    if not layer.pack(GemmPolicy(max_rows=8)):
        pytest.skip("this torch build has no oneDNN packer")
    assert layer.packed.library == "onednn" and layer.packed.own is None
    runs = []
    real = packed_gemm._run
    monkeypatch.setattr(packed_gemm, "_run", lambda kind, *a: runs.append(kind) or real(kind, *a))
    for rows in (1, 5, 300):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
    assert runs == ["onednn"] * 3


def test_a_forced_kind_serves_every_row_count_and_one_that_cannot_be_made_is_an_error(
        monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_SMALL_GEMM_ROWS", raising=False)
    packed_gemm.gemm_table.cache_clear()
    weight = torch.randn(48, 32)
    packed = packed_gemm.packed_weight(weight, policy=GemmPolicy(forced="torch"))
    assert packed is None  # nothing to copy: F.linear everywhere
    packed = packed_gemm.packed_weight(weight, policy=GemmPolicy(forced="onednn"))
    if packed is not None:
        assert set(packed.table.kinds) == {"onednn"} and packed.library == "onednn"
    with pytest.raises(ValueError, match="cpu_gemm 'mkl'.*fp32 only"):
        packed_gemm.packed_weight(weight.to(torch.bfloat16), policy=GemmPolicy(forced="mkl"))
    packed_gemm.gemm_table.cache_clear()


def test_a_real_measurement_times_every_kind_that_packs():
    bounds = (1, 4)
    seconds = packed_gemm.measure(32, 48, torch.float32, ["own", "onednn", "mkl", "torch"],
                                  bounds)
    assert "torch" in seconds
    assert all(len(t) == len(bounds) and all(s > 0 for s in t) for t in seconds.values())
    assert set(choose(seconds, bounds).kinds) <= set(seconds)

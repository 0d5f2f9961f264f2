"""The compiled CPU decode kernel (kernels/cpu_attention.py, what backend="cpu" runs for fp32
and bf16 decodes) against kernels.reference, and the build-and-cache machinery of
kernels/native.py."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from pagedserve_kernels import cpu_attention, native, ops, reference, torch_attention
from tests.kernels.test_paged_attention import (
    POISON,
    batch_seqs,
    make_batch,
)

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler: the cpu backend falls back to the torch path")


@pytest.fixture
def native_only(monkeypatch):
    """Fail if a decode or a prompt row would take the torch path instead of the kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("a row went through the torch path")
    monkeypatch.setattr(torch_attention, "_decode_attention", refuse)
    monkeypatch.setattr(torch_attention, "_one_sequence", refuse)


@needs_compiler
def test_kernel_builds_here():
    assert cpu_attention.available()
    assert ops._resolve("auto", torch.zeros(1)) == "cpu"


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_decodes", [1, 3, 13])  # tasks per kv head, and whole decodes
@pytest.mark.parametrize("head_dim,group,block_size,window", [
    (64, 3, 16, None), (128, 1, 32, 40), (80, 4, 16, 9), (32, 8, 16, None), (48, 2, 32, 17),
    (40, 2, 16, 21)])
def test_decodes_run_in_the_kernel(dtype, num_decodes, head_dim, group, block_size, window,
                                   native_only, assert_close):
    """Head dims with a compiled specialisation (32, 64, 128) and without (40, 48, 80; 40 is no
    multiple of 16: per-token dot products instead of 16 tokens per vector, and for bf16 a
    value row summed partly by vectors, partly one by one), windows shorter and longer than a
    block, lengths from 1 to several blocks."""
    lengths = [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 70, 2, 33]
    seqs = [(lengths[i % len(lengths)] - 1, 1) for i in range(num_decodes)]
    batch = make_batch(seqs, num_kv_heads=2, group=group, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=num_decodes + head_dim)
    out = torch.full_like(batch.query, float("nan"))
    ops.paged_attention(*batch.args(), out=out, sliding_window=window, backend="cpu")
    assert_close(out, reference.paged_attention(*batch.args(), sliding_window=window))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 9, 40])
def test_prompt_rows_run_in_the_kernel(dtype, window, native_only, assert_close):
    """Whole prompts, prefill chunks after a cached context, a 1-token prompt and decodes in
    one batch: each prompt row is a decode over its own causal prefix, so the kernel takes
    every row; windows shorter and longer than a block."""
    seqs = [(0, 17), (20, 1), (33, 40), (0, 1), (5, 4), (16, 16)]
    batch = make_batch(seqs, num_kv_heads=2, group=3, head_dim=64, block_size=16, dtype=dtype,
                       seed=21)
    out = torch.full_like(batch.query, float("nan"))
    ops.paged_attention(*batch.args(), out=out, sliding_window=window, backend="cpu")
    assert_close(out, reference.paged_attention(*batch.args(), sliding_window=window))


@needs_compiler
@pytest.mark.parametrize("limit", [0, 20, 40])
def test_prompts_longer_than_the_plans_limit_keep_sdpa(limit, monkeypatch, assert_close):
    """native_prefill_len: the prompt rows of longer sequences go through SDPA (one call per
    such prompt), the rest and every decode through the kernel, in one step."""
    seqs = [(0, 17), (20, 1), (33, 40), (0, 1), (5, 4), (16, 16)]
    batch = make_batch(seqs, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=22)
    _, _, _, table, seq_lens, starts = batch.args()[:6]
    plan = ops.attention_plan(table, seq_lens, starts, 16, None, backend="cpu",
                                  native_prefill_len=limit)
    sdpa_lens = []
    one_sequence = torch_attention._one_sequence

    def counted(query, key_cache, value_cache, p, scale, out):
        sdpa_lens.append(p.seq_len)
        one_sequence(query, key_cache, value_cache, p, scale, out)
    monkeypatch.setattr(torch_attention, "_one_sequence", counted)
    out = ops.paged_attention(*batch.args(), plan=plan)
    assert_close(out, reference.paged_attention(*batch.args()))
    assert sorted(sdpa_lens) == sorted(c + q for c, q in seqs if q > 1 and c + q > limit)


@needs_compiler
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_strided_query_cache_and_out(kind, native_only, assert_close):
    """K and V as views of one buffer, the query a view of a fused projection, `out` a view:
    the kernel follows the strides and writes nothing outside `out`."""
    batch = make_batch(batch_seqs(kind, 16), num_kv_heads=2, group=4, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=11, strided=True)
    num_tokens, num_heads, head_dim = batch.query.shape
    out_buf = torch.full((num_tokens, num_heads + 1, head_dim), POISON)
    out_buf[:, :num_heads] = float("nan")
    out = out_buf[:, :num_heads]
    ops.paged_attention(*batch.args(), out=out, backend="cpu")
    assert_close(out, reference.paged_attention(*batch.args()))
    assert (out_buf[:, -1] == POISON).all()


@needs_compiler
def test_plan_from_the_runner_entry_point_is_native(native_only, assert_close):
    batch = make_batch([(20, 1), (0, 17), (33, 1)], num_kv_heads=1, group=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=6)
    _, _, _, table, seq_lens, starts = batch.args()[:6]
    plan = ops.attention_plan(table, seq_lens, starts, 16, None, backend="auto")
    assert plan.native and plan.gather is None
    for _ in range(2):  # one plan, every layer
        assert_close(ops.paged_attention(*batch.args(), plan=plan),
                     reference.paged_attention(*batch.args()))
    assert plan.gather is None and not plan.buffers  # nothing gathered


@needs_compiler
def test_unsupported_tensors_take_the_torch_path(assert_close):
    """fp16, or an `out` whose heads are not contiguous: the plan's torch gather runs."""
    batch = make_batch(batch_seqs("decode", 16), num_kv_heads=2, group=2, head_dim=64,
                       block_size=16, dtype=torch.float16, seed=2)
    assert not cpu_attention.supports(*batch.args()[:3])
    assert_close(ops.paged_attention(*batch.args(), backend="cpu"),
                 reference.paged_attention(*batch.args()))
    batch = make_batch(batch_seqs("decode", 16), num_kv_heads=2, group=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=2)
    out = torch.full((batch.query.shape[0], batch.query.shape[2], batch.query.shape[1]),
                     float("nan")).transpose(1, 2)
    assert not cpu_attention.supports(*batch.args()[:3], out)
    ops.paged_attention(*batch.args(), out=out, backend="cpu")
    assert_close(out, reference.paged_attention(*batch.args()))


# --- kernels/native.py: build once, cache, fall back -------------------------------------------

SOURCE = 'extern "C" int answer(void) { return 42; }\n'


@pytest.fixture
def scratch_source(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "answer.cpp").write_text(SOURCE)
    monkeypatch.setattr(native, "SOURCE_DIR", src)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    return src


@needs_compiler
def test_build_is_cached_and_keyed_by_the_source(scratch_source, tmp_path):
    lib = native.load("answer")
    assert lib is not None and lib.answer() == 42
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    assert native.load("answer") is lib  # loaded once per process
    mtime = built[0].stat().st_mtime_ns
    compiler = shutil.which("c++") or shutil.which("g++")
    assert native.build("answer", compiler) == built[0]  # cache hit: no rebuild
    assert built[0].stat().st_mtime_ns == mtime
    (scratch_source / "answer.cpp").write_text(SOURCE.replace("42", "43"))
    changed = native.build("answer", compiler)
    assert changed != built[0]  # a changed source is a new library
    (scratch_source / "shared.h").write_text("// a header the sources may include\n")
    assert native.build("answer", compiler) not in (built[0], changed)  # so is a changed header


def test_failed_build_falls_back_with_one_warning(scratch_source, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="pagedserve_kernels.native"):
        assert native.load("answer") is None
        assert native.load("answer") is None
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left


@needs_compiler
@pytest.mark.parametrize("damage,match", [
    (lambda b: b.block_table.__setitem__((0, 0), b.key_cache.shape[0]), "outside"),
    (lambda b: b.block_table.__setitem__((1, 0), -1), "outside"),
    (lambda b: b.seq_lens.__setitem__(0, b.block_table.shape[1] * 16 + 1), "longer"),
])
def test_out_of_range_inputs_raise_instead_of_reading_memory(damage, match):
    batch = make_batch(batch_seqs("decode", 16), num_kv_heads=2, group=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=9)
    damage(batch)
    with pytest.raises(ValueError, match=match):
        ops.paged_attention(*batch.args(), backend="cpu")

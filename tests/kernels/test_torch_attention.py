"""The torch fast path (kernels/torch_attention.py, what backend="torch" runs, and with the
compiled decode kernel what backend="cpu" runs) against the straightforward reference, over the
same sampled matrix as the Triton kernels."""

from __future__ import annotations

import warnings

import pytest
import torch

from pagedserve_kernels import ops, reference
from tests.kernels.test_cpu_attention import needs_compiler
from tests.kernels.test_paged_attention import (
    DTYPES,
    POISON,
    batch_seqs,
    make_batch,
    single_pass_cases,
    window_size,
)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_compiler)])
@pytest.mark.parametrize("case", single_pass_cases(), ids=lambda c: c.id)
def test_torch_path_matches_reference(case, backend, assert_close):
    """Every kind of batch; with backend "cpu" fp32 decodes run in the compiled kernel and
    everything else in the torch path."""
    bs = case.block_size
    batch = make_batch(batch_seqs(case.kind, bs), num_kv_heads=case.kv_heads, group=case.group,
                       head_dim=case.head_dim, block_size=bs, dtype=DTYPES[case.dtype],
                       seed=case.seed())
    window = window_size(case.window, bs)
    out = torch.full_like(batch.query, float("nan"))
    result = ops.paged_attention(*batch.args(), out=out, sliding_window=window,
                                     backend=backend)
    assert result is out
    assert_close(out, reference.paged_attention(*batch.args(), sliding_window=window))


def test_torch_path_decode_rows_inside_a_mixed_batch(assert_close):
    """Several decodes among prompts take the batched decode call for just those rows."""
    seqs = [(20, 1), (0, 17), (33, 1), (5, 4), (2, 1)]
    batch = make_batch(seqs, num_kv_heads=2, group=4, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=3)
    out = ops.paged_attention(*batch.args(), backend="torch")
    assert_close(out, reference.paged_attention(*batch.args()))


def test_one_plan_serves_every_call_of_a_step(assert_close):
    """A plan built once gives each call the reference's result; a plan for another window or
    block size is not trusted (rebuilt)."""
    seqs = [(20, 1), (0, 17), (33, 1), (5, 4), (2, 1)]
    batch = make_batch(seqs, num_kv_heads=2, group=4, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=5)
    _, _, _, table, seq_lens, starts = batch.args()[:6]
    plan = ops.attention_plan(table, seq_lens, starts, 16, None, backend="torch")
    expected = reference.paged_attention(*batch.args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a reused gather buffer of the wrong shape
        for _ in range(2):
            assert_close(ops.paged_attention(*batch.args(), backend="torch", plan=plan),
                         expected)
    assert sorted(k[0] for k in plan.buffers) == ["k", "v"]  # one K and one V buffer, reused
    windowed = reference.paged_attention(*batch.args(), sliding_window=7)
    assert_close(ops.paged_attention(*batch.args(), sliding_window=7, backend="torch",
                                         plan=plan), windowed)


def test_all_decode_plan_batches_every_row():
    seqs = [(20, 1), (33, 1), (2, 1)]
    batch = make_batch(seqs, num_kv_heads=1, group=2, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=6)
    _, _, _, table, seq_lens, starts = batch.args()[:6]
    plan = ops.attention_plan(table, seq_lens, starts, 16, None, backend="torch")
    assert plan.all_decode and not plan.prefills and not plan.native
    assert plan.decode_gather().width == 3 and plan.decode_gather().blocks.numel() == 3 * 3


POISONED_BATCHES = {
    # (context, new tokens) per sequence, kv heads, group, head_dim
    "decodes-gqa3-d96": ([(40, 1), (7, 1), (16, 1), (29, 1)], 1, 3, 96),
    "mixed-d80": ([(20, 1), (0, 17), (33, 1), (5, 4), (2, 1)], 2, 2, 80),
    "one-decode-d64": ([(21, 1)], 2, 4, 64),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_compiler),
                                     "triton"])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("name", sorted(POISONED_BATCHES))
def test_unused_slots_full_of_nan_change_nothing(name, window, backend):
    """Every cache slot at or past a sequence's length, and every block the table's padding
    names, holds NaN: the output is bitwise the one with finite junk there (attention reads only
    positions < seq_len, so one request's overflow cannot poison the next owner of a block)."""
    seqs, kv_heads, group, head_dim = POISONED_BATCHES[name]
    batch = make_batch(seqs, num_kv_heads=kv_heads, group=group, head_dim=head_dim,
                       block_size=16, dtype=torch.float32, seed=11)
    clean = ops.paged_attention(*batch.args(), sliding_window=window, backend=backend)
    for cache in (batch.key_cache, batch.value_cache):
        cache[cache == POISON] = float("nan")
    poisoned = ops.paged_attention(*batch.args(), sliding_window=window, backend=backend)
    assert not poisoned.isnan().any()
    assert torch.equal(poisoned, clean)

"""The torch fast path (kernels/torch_attention.py, what backend="torch" runs) against the
straightforward reference, over the same sampled matrix as the Triton kernels."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.test_paged_attention import (
    DTYPES,
    batch_seqs,
    make_batch,
    single_pass_cases,
    window_size,
)


@pytest.mark.parametrize("case", single_pass_cases(), ids=lambda c: c.id)
def test_torch_path_matches_reference(case, assert_close):
    bs = case.block_size
    batch = make_batch(batch_seqs(case.kind, bs), num_kv_heads=case.kv_heads, group=case.group,
                       head_dim=case.head_dim, block_size=bs, dtype=DTYPES[case.dtype],
                       seed=case.seed())
    window = window_size(case.window, bs)
    out = torch.full_like(batch.query, float("nan"))
    result = kernels.paged_attention(*batch.args(), out=out, sliding_window=window,
                                     backend="torch")
    assert result is out
    assert_close(out, reference.paged_attention(*batch.args(), sliding_window=window))


def test_torch_path_decode_rows_inside_a_mixed_batch(assert_close):
    """Several decodes among prompts take the batched decode call for just those rows."""
    seqs = [(20, 1), (0, 17), (33, 1), (5, 4), (2, 1)]
    batch = make_batch(seqs, num_kv_heads=2, group=4, head_dim=64, block_size=16,
                       dtype=torch.float32, seed=3)
    out = kernels.paged_attention(*batch.args(), backend="torch")
    assert_close(out, reference.paged_attention(*batch.args()))

"""The CPU token-bitmask kernel (kernels/token_bitmask.py) equals the torch reference and
xgrammar's own kernel: random masks, dense and sparse, all-allowed and all-banned words, a
vocabulary that is no multiple of 32, a subset of rows; bad shapes are refused."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from pagedserve_kernels import native, reference
from pagedserve_kernels.token_bitmask import apply_token_bitmask_


def pack(allowed: torch.Tensor) -> torch.Tensor:
    rows, vocab = allowed.shape
    words = -(-vocab // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    value = (padded.view(rows, words, 32).to(torch.int64) << torch.arange(32)).sum(-1)
    return torch.where(value < 2**31, value, value - 2**32).to(torch.int32)


@pytest.mark.parametrize("vocab", [32, 77, 49152 + 5])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_equals_the_reference_and_xgrammar(vocab, density):
    torch.manual_seed(vocab)
    allowed = torch.rand(6, vocab) < density
    allowed[1, : min(64, vocab)] = True  # whole words allowed
    allowed[2, : min(64, vocab)] = False  # whole words banned
    bitmask = pack(allowed)
    rows = [0, 1, 2, 4]
    logits = torch.randn(6, vocab)
    outs = [logits.clone() for _ in range(3)]
    apply_token_bitmask_(outs[0], bitmask, rows)
    reference.apply_token_bitmask(outs[1], bitmask, rows)
    xgr.apply_token_bitmask_inplace(outs[2], bitmask, indices=rows, vocab_size=vocab)
    assert torch.equal(outs[0], outs[1])
    if vocab % 32 == 0:  # otherwise xgrammar 0.2.9's CPU kernel also masks stray entries
        assert torch.equal(outs[0], outs[2])
    expected = logits.clone()
    for r in rows:
        expected[r][~allowed[r]] = float("-inf")
    assert torch.equal(outs[0], expected)


def test_the_native_kernel_is_what_runs():
    if native.load("bitmask_cpu") is None:
        pytest.skip("no C++ compiler here: the torch reference runs")
    assert native.load("bitmask_cpu") is not None


@pytest.mark.parametrize("logits, bitmask, rows, words", [
    (torch.zeros(2, 64), torch.zeros(2, 1, dtype=torch.int32), [0], "at least"),
    (torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64), [0], "int32"),
    (torch.zeros(2, 64), torch.zeros(3, 2, dtype=torch.int32), [0], "batch"),
    (torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int32), [2], "rows"),
])
def test_bad_arguments_are_refused(logits, bitmask, rows, words):
    with pytest.raises(ValueError, match=words):
        apply_token_bitmask_(logits, bitmask, rows)

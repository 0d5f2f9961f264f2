"""The CPU argmax of greedy sampling (kernels/argmax.py) gives torch's `max(dim=-1).indices`
in fp32 and bf16: random rows of every length around the 16-lane vector and its tail, ties
inside a lane, across lanes and in the tail, all -inf, NaN, strided rows, batches large enough
for the threads; other layouts fall back to the reference; bad shapes are refused."""

from __future__ import annotations

import pytest
import torch

from pagedserve_kernels import argmax, reference
from pagedserve_kernels.argmax import argmax_rows

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def built():
    assert argmax._library() is not None, "the argmax kernel must build here"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (5, 16), (7, 17), (2, 33), (4, 1000),
                                   (64, 49152), (3, 151936 + 5)])
def test_random_rows_equal_the_reference(dtype, shape):
    torch.manual_seed(shape[1])
    logits = (torch.randn(shape) * 4).to(dtype)  # bf16 rounding makes ties too
    assert torch.equal(argmax_rows(logits), reference.argmax_rows(logits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_maximum(dtype):
    logits = torch.zeros(6, 53, dtype=dtype)
    logits[1, [3, 19]] = 5.0  # two lanes' runs: lane 3 holds index 3, lane 3 also 19
    logits[2, [7, 20, 40]] = 5.0  # different lanes: the smallest index wins
    logits[3, [50, 51]] = 5.0  # the scalar tail
    logits[4, [44, 49]] = 5.0  # one in the vector part, one in the tail
    logits[5] = float("-inf")
    assert argmax_rows(logits).tolist() == [0, 3, 7, 50, 44, 0]
    assert torch.equal(argmax_rows(logits), reference.argmax_rows(logits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_answers_the_first_nan(dtype):
    logits = torch.randn(4, 70).to(dtype)
    logits[0, 5] = float("nan")
    logits[1, [66, 68]] = float("nan")  # in the tail
    logits[2, [20, 35]] = float("nan")
    logits[2, 1] = float("inf")
    assert argmax_rows(logits)[:3].tolist() == [5, 66, 20]
    assert torch.equal(argmax_rows(logits), reference.argmax_rows(logits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_fallback_layouts(dtype):
    torch.manual_seed(0)
    wide = torch.randn(8, 300).to(dtype)
    rows = wide[:, 10:250]  # a row stride other than the row length
    assert torch.equal(argmax_rows(rows), reference.argmax_rows(rows))
    columns = torch.randn(240, 8).to(dtype).t()  # strided columns: the reference path
    assert torch.equal(argmax_rows(columns), reference.argmax_rows(columns))
    half = torch.randn(3, 40).half()
    assert torch.equal(argmax_rows(half), reference.argmax_rows(half))


@pytest.mark.parametrize("shape", [(4,), (2, 0), (1, 2, 3)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="logits must be"):
        argmax_rows(torch.zeros(shape))

"""The CPU-only speed-ups: oneDNN-prepacked linear weights and the malloc thresholds."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from server.model_runner.cpu_allocator import keep_freed_memory_mapped
from server.models.layers import linear as linear_mod
from server.models.layers.linear import PACKED_MIN_ROWS, Linear, pack_linear_weights


@pytest.mark.parametrize("rows", [1, PACKED_MIN_ROWS - 1, PACKED_MIN_ROWS, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.pack()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_packed_path_is_taken_only_from_min_rows(monkeypatch):
    layer = Linear(32, 48)
    assert layer.pack()
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(*args):
            calls.append(args[0].shape[0])
            return real(*args)

    monkeypatch.setattr(linear_mod.torch.ops, "mkldnn", Spy)
    layer(torch.randn(PACKED_MIN_ROWS - 1, 32))
    layer(torch.randn(PACKED_MIN_ROWS, 32))
    assert calls == [PACKED_MIN_ROWS]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_stay_unpacked(dtype):
    layer = Linear(16, 16).to(dtype)
    assert not layer.pack() and layer.packed is None
    x = torch.randn(8, 16, dtype=dtype)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_pack_linear_weights_counts_modules_and_the_model_hook():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Linear(8, 8), Linear(8, 4)
            self.plain = torch.nn.Linear(8, 8)  # not ours: left alone

        def pack_weights(self):
            return 1

    model = Model()
    assert pack_linear_weights(model) == 3
    assert model.a.packed is not None and not hasattr(model.plain, "packed")


def test_tied_logits_head_uses_a_packed_embedding(tmp_path):
    from server import LLM
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2")  # tied embeddings
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    model = llm.engine.runner.model
    assert model.lm_head is None and model._tied_packed is not None
    hidden = torch.randn(PACKED_MIN_ROWS + 3, model.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden),
                               F.linear(hidden, model.model.embed_tokens.weight),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_apply_and_are_idempotent():
    assert keep_freed_memory_mapped()
    assert keep_freed_memory_mapped()

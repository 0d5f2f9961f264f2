"""End to end: a tiny random-weight model generating greedily through the Triton kernels
(interpreted on CPU, engine arg `attention_backend="triton"`) gives the torch path's tokens.

A small token budget makes the engine chunk the longer prompts, and a second round of prompts
that extend the first round's hits the prefix cache, so the kernels see decode-only batches,
whole prompts, chunks on a cached prefix and mixes of them.
"""

from __future__ import annotations

import importlib
import random

import pytest

from server import LLM, SamplingParams
from tests.model_factory import make_tiny_model

MAX_TOKENS = 4


def prompts(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    first = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 15, 17, 30)]
    # extend two earlier prompts past a full block: prefix hits, then chunks on the prefix
    second = [first[3][:20] + [rng.randrange(3, 512) for _ in range(6)],
              first[2] + [rng.randrange(3, 512) for _ in range(9)]]
    return first, second


@pytest.fixture
def batches(monkeypatch) -> list[str]:
    """Spy on the Triton wrappers: the kind of every batch paged_attention gets."""
    pa = importlib.import_module("pagedserve_kernels.paged_attention")
    rc = importlib.import_module("pagedserve_kernels.reshape_and_cache")
    seen: list[str] = []
    attention, cache = pa.paged_attention, rc.reshape_and_cache

    def spy_attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                      *args, **kwargs):
        q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
        contexts = [s - q for s, q in zip(seq_lens.tolist(), q_lens)]
        kinds = {"decode" if q == 1 and c > 0 else "chunk" if c > 0 else "prompt"
                 for q, c in zip(q_lens, contexts)}
        seen.append("+".join(sorted(kinds)))
        return attention(query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                         *args, **kwargs)

    def spy_cache(*args, **kwargs):
        seen.append("cache")
        return cache(*args, **kwargs)

    monkeypatch.setattr(pa, "paged_attention", spy_attention)
    monkeypatch.setattr(rc, "reshape_and_cache", spy_cache)
    return seen


def generate(model_dir, backend: str, rounds) -> list[list[int]]:
    llm = LLM(str(model_dir), kv_cache_memory=1 << 22, attention_backend=backend,
              max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    tokens = []
    for round_prompts in rounds:
        tokens += [list(out.outputs[0].token_ids) for out in llm.generate(round_prompts, params)]
    return tokens


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: a sliding window of 12
def test_triton_backend_generates_the_torch_tokens(arch, tmp_path, batches):
    model_dir = make_tiny_model(tmp_path / arch, arch)
    rounds = prompts(seed=len(arch))
    expected = generate(model_dir, "torch", rounds)
    assert batches == [], "the torch backend went through the Triton wrappers"
    assert all(len(t) == MAX_TOKENS for t in expected)

    got = generate(model_dir, "triton", rounds)
    assert got == expected
    kinds = set(batches)
    assert "cache" in kinds
    assert "decode" in kinds  # decode-only batches
    assert any("chunk" in k for k in kinds)  # chunks on a cached prefix
    assert any("+" in k for k in kinds)  # mixed batches

"""`pagedserve bench perplexity` (server/bench/perplexity.py): its perplexity is transformers'
on the same chunks, and the accuracy of the quantized paths stays within bounds on real
weights: the bundled TinyStories model with --quantization int8, and the real
SmolLM2-135M-Instruct Q4_1 file against transformers' fp32 conversion of it (the figures these
bounds leave room around are in docs/performance.md, "Accuracy of the quantized paths")."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server import LLM
from server.assets import BUNDLED_MODEL_DIR
from server.bench.perplexity import (
    agreement,
    make_chunks,
    perplexity,
    prompt_logprobs,
    scored_positions,
    top_logprob_delta,
)
from server.cli import main
from tests import real_model
from tests.model_factory import _hf_model, make_tiny_model


def test_chunks_scores_and_agreement_are_computed_as_documented():
    chunks = make_chunks(list(range(10, 30)), 8, bos=1)
    assert chunks == [[1, 11, 12, 13, 14, 15, 16, 17], [1, 19, 20, 21, 22, 23, 24, 25]]
    assert make_chunks(list(range(9)), 4, bos=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one chunk"):
        make_chunks([1, 2, 3], 4, bos=None)
    assert list(scored_positions(8)) == [5, 6, 7]  # token j + 1 from the logits at j >= 4
    lps = [[{}, {}, {}, {}, {12: -1.0}, {13: -2.0}, {14: -3.0}]]
    scores = perplexity([[0, 0, 0, 0, 0, 12, 13, 14]], lps)
    assert scores.scored_tokens == 3 and math.isclose(scores.perplexity, math.exp(2.0))
    ref = [[{}] * 4 + [{t: -0.1 * t for t in range(7)}] * 3]
    model = [[{}] * 4 + [{t: -0.1 * t - 0.5 for t in range(4)}] * 3]  # top-5 token 4 missing
    delta, found = top_logprob_delta([[0] * 8], ref, model)
    assert math.isclose(delta, 0.5) and math.isclose(found, 4 / 5)
    assert agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 4], [5, 6, 7, 8]]) == (0.75, 0.5)


def test_the_perplexity_is_transformers_on_the_same_chunks(tmp_path):
    model_dir = make_tiny_model(tmp_path / "llama", "llama")
    ids = torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    chunks = make_chunks(ids, 64, bos=1)
    ours = perplexity(chunks, prompt_logprobs(LLM(str(model_dir), kv_cache_memory=1 << 22),
                                              chunks, 0))
    hf = _hf_model(model_dir)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logprobs = hf(input_ids=torch.tensor([chunk])).logits[0].log_softmax(-1)
            for p in scored_positions(len(chunk)):
                nll -= float(logprobs[p - 1, chunk[p]])
                count += 1
    assert ours.scored_tokens == count == 4 * 31
    assert math.isclose(ours.perplexity, math.exp(nll / count), rel_tol=1e-4)


def run(tmp_path, *flags) -> dict:
    out = tmp_path / "summary.json"
    assert main(["bench", "perplexity", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_int8_on_the_bundled_model_stays_close_to_fp32(tmp_path):
    """Measured on an Intel Xeon: PPL ratio 1.003, top-5 |Δ| 0.050, 67% greedy agreement."""
    summary = run(tmp_path, "--quantization", "int8", "--reference", str(BUNDLED_MODEL_DIR),
                  "--kv-cache-memory", str(1 << 24))
    ref = summary["reference"]
    assert summary["quantization"] == "int8" and ref["quantization"] == "none"
    assert summary["chunks"] == 17 and 1 < ref["perplexity"] < 10
    assert ref["perplexity_ratio"] < 1.01
    assert ref["top5_mean_abs_delta_logprob"] < 0.1 and ref["top5_found"] > 0.99
    assert ref["greedy_agreement"] > 0.4


def test_the_real_q4_1_file_stays_close_to_its_fp32_conversion(smollm2_dir, tmp_path):
    """The file's blocks with 8-bit activations against the same weights in fp32 (transformers'
    dequantization): what quantizing the activations costs. Measured on an Intel Xeon: PPL
    ratio 1.002, top-5 |Δ| 0.066."""
    summary = run(tmp_path, "--model", str(real_model.gguf_path()), "--reference",
                  str(smollm2_dir), "--max-model-len", "512", "--kv-cache-memory", str(1 << 26))
    ref = summary["reference"]
    assert summary["quantization"] == "gguf" and summary["chunks"] == 8
    assert 5 < ref["perplexity"] < 30
    assert ref["perplexity_ratio"] < 1.01
    assert ref["top5_mean_abs_delta_logprob"] < 0.15 and ref["top5_found"] > 0.99

"""The bundled stories260k (a real pretrained model) against transformers' own generate()."""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from server.assets import BUNDLED_MODEL_DIR

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park. They saw a big dog",
    "The sun",
    "Tom had a red ball. He liked to throw it very high. One day the ball",
    "Mom said",
    "There was a little bird who could not fly. Every day",
    "A cat",
    "Sue wanted to bake a cake for her friend. She got flour, eggs and",
    "The boat",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory=1 << 24)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
    return tokenizer, model


def hf_generate(hf, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer, model = hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_default_model_is_bundled(llm):
    assert llm.engine.model_dir == BUNDLED_MODEL_DIR
    assert llm.engine.generation.eos_token_ids == (2, 1)


def test_once_upon_a_time_matches_transformers_generate(llm, hf):
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=48, temperature=0))[0]
    expected = hf_generate(hf, "Once upon a time", 48)
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == hf[0].decode(expected, skip_special_tokens=True)
    assert out.outputs[0].text.startswith(", there was a little girl named Lily.")


def test_batch_matches_generate(llm, hf):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_generate(hf, prompt, 40), prompt


def test_stories_end_with_an_eos_id_as_in_generate(llm, hf):
    """The model ends a story with <s> (id 1), an eos id through generation_config.json."""
    prompts = [PROMPTS[3], PROMPTS[8]]  # both stories end within 150 tokens
    outs = llm.generate(prompts, SamplingParams(max_tokens=160, temperature=0))
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop"
        assert completion.token_ids[-1] == 1
        assert completion.token_ids == hf_generate(hf, prompt, 160)


def test_second_request_sharing_prefix_is_cached(llm):
    story = PROMPTS[3] + " went over the fence and into the garden of the old man"
    first = llm.generate([story], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(first.prompt_token_ids) >= 33
    second = llm.generate([story + " next door"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert second.num_cached_tokens >= 32

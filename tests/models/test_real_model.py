"""The real instruct model (SmolLM2-135M-Instruct, tests/real_model.py) served over HTTP: its
chat template and tokenizer through the API, an answer a person would check, and prompt
logprobs that rank the right continuation first (lm-evaluation-harness' loglikelihood
request)."""

from __future__ import annotations

from tests.real_model import SERVED_NAME as NAME


def test_the_chat_template_and_an_answer(smollm2_server):
    s = smollm2_server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = s.chat(messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in out["choices"][0]["message"]["content"]
    rendered = s.tokenize(messages=messages)["tokens"]
    assert out["usage"]["prompt_tokens"] == len(rendered)
    text = s.post("/detokenize", {"model": NAME, "tokens": rendered}).json()["prompt"]
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def _continuation_logprob(s, context: str, continuation: str) -> float:
    """What lm-evaluation-harness' local-completions sends for one loglikelihood request."""
    context_ids = s.tokenize(context)["tokens"]
    whole = s.tokenize(context + continuation)["tokens"]
    assert whole[:len(context_ids)] == context_ids
    out = s.complete(prompt=whole, echo=True, logprobs=1, max_tokens=0, temperature=0)
    scored = out["choices"][0]["logprobs"]["token_logprobs"]
    return sum(scored[len(context_ids):])


def test_prompt_logprobs_prefer_the_right_continuation(smollm2_server):
    s = smollm2_server
    context = "The capital of France is"
    paris = _continuation_logprob(s, context, " Paris")
    assert paris > _continuation_logprob(s, context, " London")
    assert paris > _continuation_logprob(s, context, " a banana")

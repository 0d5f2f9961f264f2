"""The official openai SDK against the real instruct model, for what issue 13's clients send:
prompt scoring works; structured outputs and tools, not supported yet, are refused with a 400
naming the field (the SDK raises BadRequestError) rather than answered as plain text."""

from __future__ import annotations

import openai
import pytest
from pydantic import BaseModel


class Capital(BaseModel):
    country: str
    city: str


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_echo_scores_the_prompt(smollm2_server):
    client = smollm2_server.openai()
    prompt = "The capital of France is Paris"
    out = client.completions.create(model=smollm2_server.model_name, prompt=prompt, echo=True,
                                    logprobs=1, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    scored = choice.logprobs.token_logprobs
    assert scored[0] is None and len(scored) == out.usage.prompt_tokens
    assert all(lp is not None and lp <= 0 for lp in scored[1:])
    assert out.usage.completion_tokens == 0


@pytest.mark.parametrize("call,param", [
    (lambda c, m: c.chat.completions.parse(model=m, messages=MESSAGES,
                                           response_format=Capital), "response_format"),
    (lambda c, m: c.chat.completions.create(
        model=m, messages=MESSAGES, tools=[{"type": "function", "function": {
            "name": "lookup", "parameters": {"type": "object", "properties": {}}}}]),
     "tools"),
    (lambda c, m: c.chat.completions.create(model=m, messages=MESSAGES,
                                            response_format={"type": "json_object"}),
     "response_format"),
])
def test_what_is_not_supported_yet_is_refused_by_name(smollm2_server, call, param):
    client = smollm2_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        call(client, smollm2_server.model_name)
    assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_parameter"

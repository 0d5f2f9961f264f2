"""The official openai SDK against the real instruct model, for what issue 13's clients send:
prompt scoring and structured outputs (`parse` with a pydantic model, streamed and not; JSON
mode) work; tools on a template that drops them are refused with a 400 naming the field (the
SDK raises BadRequestError) rather than answered as plain text (tools with a template that has
them: test_openai_tools.py)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import xgrammar
from pydantic import BaseModel

from server.sampling_params import StructuredOutputsParams
from server.structured.grammar import build_grammar


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


def test_parse_gives_the_pydantic_model(smollm2_server):
    client = smollm2_server.openai()
    out = client.chat.completions.parse(model=smollm2_server.model_name, messages=MESSAGES,
                                        response_format=Capital, temperature=0, max_tokens=64)
    message = out.choices[0].message
    jsonschema.validate(json.loads(message.content), Capital.model_json_schema())
    assert isinstance(message.parsed, Capital) and message.parsed.city == "Paris"
    assert out.choices[0].finish_reason == "stop"


def test_parse_streamed(smollm2_server):
    client = smollm2_server.openai()
    with client.chat.completions.stream(model=smollm2_server.model_name, messages=MESSAGES,
                                        response_format=Capital, temperature=0,
                                        max_tokens=64) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.city == "Paris"
    assert "".join(deltas) == final.choices[0].message.content


def test_json_mode_writes_only_json(smollm2_server):
    """A 135M model in JSON mode loops on pretty-printed keys past any max_tokens, so what it
    writes is checked as a prefix of the object grammar; compact JSON (vLLM's
    disable_any_whitespace, through extra_body) lets it finish, and parses."""
    client = smollm2_server.openai()
    messages = [{"role": "user", "content": "Give the capital of France as JSON."}]
    out = client.chat.completions.create(model=smollm2_server.model_name, temperature=0,
                                         max_tokens=48, messages=messages,
                                         response_format={"type": "json_object"})
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(xgrammar.TokenizerInfo(
        [])).compile_grammar(build_grammar(StructuredOutputsParams(json_object=True))))
    assert out.choices[0].message.content.startswith("{")
    assert matcher.accept_string(out.choices[0].message.content)
    compact = client.chat.completions.create(
        model=smollm2_server.model_name, temperature=0, max_tokens=48, messages=messages,
        extra_body={"structured_outputs": {"json_object": True,
                                           "disable_any_whitespace": True}})
    assert compact.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(compact.choices[0].message.content), dict)


def test_tools_on_a_template_without_them_are_refused_by_name(smollm2_server):
    """SmolLM2's own template drops tools: the model would never see them."""
    client = smollm2_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=smollm2_server.model_name, messages=MESSAGES, tools=[{
                "type": "function", "function": {"name": "lookup", "parameters": {
                    "type": "object", "properties": {}}}}])
    assert e.value.body["param"] == "tools" and "does not render tools" in e.value.body["message"]

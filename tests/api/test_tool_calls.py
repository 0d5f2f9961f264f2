"""Tool calling over HTTP against the fake engine, whose output is scripted text: the tools
reach the template, calls come back in OpenAI's shape (whole, and streamed as deltas with the
name once and then argument text, never an empty tool_calls list), finish_reason "tool_calls",
and what the server does for each tool_choice (the grammar it asks the engine for)."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import MODEL_NAME
from tests.http_client import assert_error

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
             '"Paris"}}\n</tool_call>')


def chat(server, **body):
    return server.post("/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES,
                                                "max_tokens": 200, **body})


def test_auto_call_whole(scripted):
    server = scripted(CALL_TEXT)
    out = chat(server, tools=TOOLS).json()
    [choice] = out["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "I will check."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # The tools reached the template; the engine was asked for the hermes structural tag.
    [params] = server.core.params_seen
    assert params.structured_outputs.structural_tag is not None
    assert "get_weather" in params.structured_outputs.structural_tag


def test_auto_call_streamed(scripted):
    server = scripted(CALL_TEXT)
    chunks, raw = server.stream("/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS,
                                                         "max_tokens": 200})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all(d.get("tool_calls") != [] for d in deltas)
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    first, *rest = calls
    assert set(first) == {"index", "id", "type", "function"} and first["index"] == 0
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
               for c in rest)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() == "I will check." and "<tool" not in content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert raw.rstrip().endswith("data: [DONE]")


def test_plain_text_with_tools_is_content(scripted):
    out = chat(scripted("It is sunny."), tools=TOOLS).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "It is sunny." and "tool_calls" not in choice["message"]


def test_named_and_required_use_the_parsers_format(scripted):
    server = scripted(CALL_TEXT.split("\n", 1)[1])
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        out = chat(server, tools=TOOLS, tool_choice=choice).json()
        assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    tags = [p.structured_outputs.structural_tag for p in server.core.params_seen]
    assert '"type":"tag"' in tags[0].replace(" ", "")  # named: that one call, nothing else
    assert '"at_least_one":true' in tags[1].replace(" ", "")


def test_without_a_parser_named_and_required_are_json(scripted):
    """With --tool-call-parser none the grammar asks for bare JSON: the function's arguments
    (named) or a list of {name, parameters} (required), as vLLM does."""
    named_server = scripted('{"city": "Paris"}', tool_call_parser="none")
    out = chat(named_server, tools=TOOLS, stream=False,
               tool_choice={"type": "function", "function": {"name": "get_weather"}}).json()
    call = out["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    schema = json.loads(named_server.core.params_seen[0].structured_outputs.json)
    assert schema == TOOLS[0]["function"]["parameters"]
    required = scripted('[{"name": "get_time", "parameters": {}}]', tool_call_parser="none")
    chunks, _ = required.stream("/v1/chat/completions", {
        "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200})
    calls = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get(
        "tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_time", "arguments": ""}
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {}
    schema = json.loads(required.core.params_seen[0].structured_outputs.json)
    assert schema["type"] == "array" and schema["minItems"] == 1


def test_tool_choice_none_renders_no_tools(scripted):
    server = scripted("Fine.")
    with_none = server.post("/tokenize", {"messages": MESSAGES}).json()["count"]
    out = chat(server, tools=TOOLS, tool_choice="none").json()
    assert out["usage"]["prompt_tokens"] == with_none
    assert server.core.params_seen[0].structured_outputs is None
    with_tools = server.post("/tokenize", {"messages": MESSAGES, "tools": TOOLS}).json()["count"]
    assert with_tools > with_none


def test_a_conversation_with_calls_and_results_renders(scripted):
    server = scripted("It is 18C in Paris.")
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    out = chat(server, tools=TOOLS, messages=messages).json()
    assert out["choices"][0]["message"]["content"] == "It is 18C in Paris."
    ids = server.post("/tokenize", {"messages": messages, "tools": TOOLS}).json()["tokens"]
    text = server.post("/detokenize", {"tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n18C\n</tool_response>" in text


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nope"}}}]}, "tools"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "18C"}], "tools": TOOLS},
     "messages"),
])
def test_bad_tool_requests_are_400s(scripted, body, param):
    assert_error(chat(scripted("x"), **body), 400, param)


def test_a_template_without_tools_is_a_400_not_a_silent_answer(scripted):
    server = scripted("x", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
                      tool_call_parser="hermes")
    error = assert_error(chat(server, tools=TOOLS), 400, "tools")
    assert "does not render tools" in error["message"]


def test_auto_without_a_parser_is_a_400(scripted):
    error = assert_error(chat(scripted("x", tool_call_parser="none"), tools=TOOLS), 400, "tools")
    assert "--tool-call-parser" in error["message"]

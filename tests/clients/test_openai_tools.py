"""The official openai SDK's tool calling against the real instruct model served with the
shipped tool template (chatml-tools, hermes parser): tool_choice auto, required and named,
streamed and not, `parse` with a pydantic function tool, and a conversation that carries a call
and its result. Every call's arguments are validated against the tool's schema."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "The current weather in a city",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "get_time",
                                           "description": "The local time in a city",
                                           "parameters": WEATHER_SCHEMA}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    city: str


def assert_valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def streamed_calls(stream) -> tuple[dict[int, list[str]], str | None, str]:
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        assert choice.delta.tool_calls != []  # never an empty list
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function.name
                calls[delta.index] = [delta.function.name, ""]
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index][1] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, finish, content


@pytest.mark.parametrize("stream", [False, True])
def test_required(smollm2_tools_server, stream):
    client = smollm2_tools_server.openai()
    kwargs = dict(model=smollm2_tools_server.model_name, messages=MESSAGES, tools=TOOLS,
                  tool_choice="required", temperature=0, max_tokens=64)
    if stream:
        calls, finish, _ = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
        name, arguments = calls[0]
    else:
        out = client.chat.completions.create(**kwargs)
        finish = out.choices[0].finish_reason
        call = out.choices[0].message.tool_calls[0]
        name, arguments = call.function.name, call.function.arguments
        assert call.id.startswith("call_")
    assert finish == "tool_calls" and name in SCHEMAS
    assert_valid(name, arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_named(smollm2_tools_server, stream):
    client = smollm2_tools_server.openai()
    kwargs = dict(model=smollm2_tools_server.model_name, messages=MESSAGES, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_time"}},
                  temperature=0, max_tokens=64)
    if stream:
        calls, _, _ = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
        assert list(calls) == [0]
        name, arguments = calls[0]
    else:
        call = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
        name, arguments = call.function.name, call.function.arguments
    assert name == "get_time"
    assert_valid(name, arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_auto(smollm2_tools_server, stream):
    """The model chooses; whatever it chose comes back well formed (a call's arguments are held
    to the schema by the structural tag), and the tools were in its prompt."""
    client = smollm2_tools_server.openai()
    kwargs = dict(model=smollm2_tools_server.model_name, messages=MESSAGES, tools=TOOLS,
                  temperature=0, max_tokens=96)
    if stream:
        calls, finish, content = streamed_calls(
            client.chat.completions.create(stream=True, **kwargs))
        pairs = list(calls.values())
    else:
        out = client.chat.completions.create(**kwargs)
        message, finish = out.choices[0].message, out.choices[0].finish_reason
        pairs = [[c.function.name, c.function.arguments] for c in message.tool_calls or []]
        content = message.content or ""
        plain = client.chat.completions.create(model=kwargs["model"], messages=MESSAGES,
                                               max_tokens=1)
        assert out.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools are in it
    assert pairs or content
    assert finish == ("tool_calls" if pairs else finish)
    for name, arguments in pairs:
        assert_valid(name, arguments)
    assert "<tool_call>" not in content


def test_parse_gives_pydantic_arguments(smollm2_tools_server):
    client = smollm2_tools_server.openai()
    out = client.chat.completions.parse(
        model=smollm2_tools_server.model_name, messages=MESSAGES, temperature=0, max_tokens=64,
        tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required")
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_conversation_with_a_call_and_its_result(smollm2_tools_server):
    client = smollm2_tools_server.openai()
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 18 C"}]
    out = client.chat.completions.create(model=smollm2_tools_server.model_name,
                                         messages=messages, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=32)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls

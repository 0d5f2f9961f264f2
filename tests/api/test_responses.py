"""POST /v1/responses against the fake engine with scripted output: instructions and input
items (messages, text parts, function calls and their outputs) become the conversation the
chat template renders; the answer is output items, whole or as the typed event stream in the
order the openai SDK expects; what is not supported is a 400 naming the field."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from tests.api.conftest import MODEL_NAME
from tests.http_client import assert_error

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def respond(server, **body):
    return server.post("/v1/responses", {"model": MODEL_NAME, "max_output_tokens": 200, **body})


def prompt_tokens(server, messages, tools=None) -> int:
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    return server.post("/tokenize", body).json()["count"]


def test_text_answer(scripted):
    server = scripted("Paris is the capital.")
    out = respond(server, input="What is the capital of France?",
                  instructions="Answer briefly.", metadata={"k": "v"}).json()
    assert out["object"] == "response" and out["id"].startswith("resp_")
    assert out["status"] == "completed" and out["error"] is None
    [item] = out["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    # (The bundled sentencepiece tokenizer decodes the first scripted token with its space.)
    assert item["content"] == [{"type": "output_text", "text": " Paris is the capital.",
                                "annotations": [], "logprobs": []}]
    assert out["instructions"] == "Answer briefly." and out["metadata"] == {"k": "v"}
    assert out["store"] is False
    usage = out["usage"]
    assert usage["input_tokens"] == prompt_tokens(server, [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_max_output_tokens_makes_it_incomplete(scripted):
    out = respond(scripted("A long answer that goes on."), input="x",
                  max_output_tokens=3).json()
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["status"] == "incomplete" and out["usage"]["output_tokens"] == 3


def test_input_items_render_as_the_conversation(scripted):
    server = scripted("It is sunny.")
    items = [{"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 18 C"}]
    out = respond(server, input=items, tools=TOOLS).json()
    assert out["output"][0]["content"][0]["text"].strip() == "It is sunny."
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items()
                                                    if k != "type"}}]
    assert out["usage"]["input_tokens"] == prompt_tokens(server, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 18 C"}], chat_tools)


def test_function_call_whole(scripted):
    out = respond(scripted(CALL), input="Weather in Paris?", tools=TOOLS,
                  tool_choice="required").json()
    [item] = out["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    assert item["call_id"].startswith("call_") and item["id"].startswith("fc_")
    assert json.loads(item["arguments"]) == {"city": "Paris"} and item["status"] == "completed"
    assert out["tool_choice"] == "required" and out["tools"][0]["name"] == "get_weather"


def events_of(server, **body) -> list[dict]:
    with server.client() as c, c.stream("POST", "/v1/responses", json={
            "model": MODEL_NAME, "max_output_tokens": 200, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.strip().split("\n\n"):
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_stream_events(scripted):
    events = events_of(scripted("Hello there."), input="Hi")
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-5:] == ["response.output_text.delta", "response.output_text.done",
                          "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text == done["text"] == " Hello there."
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    first = events[0]["response"]
    assert first["status"] == "in_progress" and first["output"] == []


def test_function_call_stream_events(scripted):
    events = events_of(scripted(CALL), input="Weather?", tools=TOOLS, tool_choice="required")
    kinds = [e["type"] for e in events]
    assert kinds[2] == "response.output_item.added" and kinds[-1] == "response.completed"
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == ""
    arguments = "".join(e["delta"] for e in events
                        if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(arguments) == {"city": "Paris"} and done["arguments"] == arguments
    assert all(e["item_id"] == added["id"] for e in events if "item_id" in e)
    assert events[-1]["response"]["output"][0]["arguments"] == arguments


def test_the_sdk_reads_it(scripted):
    class Capital(BaseModel):
        city: str

    server = scripted('{"city": "Paris"}')
    client = server.openai()
    parsed = client.responses.parse(model=MODEL_NAME, input="Capital of France?",
                                    text_format=Capital)
    assert parsed.output_parsed == Capital(city="Paris")
    schema = json.loads(server.core.params_seen[0].structured_outputs.json)
    assert schema["properties"] == {"city": {"title": "City", "type": "string"}}
    with client.responses.stream(model=MODEL_NAME, input="Capital of France?") as stream:
        assert [e.type for e in stream][-1] == "response.completed"
        assert stream.get_final_response().output_text.strip() == '{"city": "Paris"}'


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     "text.format.schema"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_is_not_supported_is_named(scripted, body, param):
    assert_error(respond(scripted("x"), **{"input": "hi", **body}), 400, param)

"""langchain-openai's ChatOpenAI against the real instruct model: with_structured_output by
JSON schema (the plain server) and by function calling, and bind_tools (the server with the
shipped tool template). Every structured answer is validated against its schema."""

from __future__ import annotations

import jsonschema
import langchain_openai
import pytest
from pydantic import BaseModel


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    city: str


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny in {city}"


def chat_model(server, **kwargs):
    return langchain_openai.ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused",
                                       model=server.model_name, temperature=0, max_tokens=64,
                                       **kwargs)


QUESTION = "What is the capital of France?"


def test_with_structured_output_json_schema(smollm2_server):
    answer = chat_model(smollm2_server).with_structured_output(
        Capital, method="json_schema").invoke(QUESTION)
    assert isinstance(answer, Capital) and answer.city == "Paris"


def test_with_structured_output_function_calling(smollm2_tools_server):
    answer = chat_model(smollm2_tools_server).with_structured_output(
        Capital, method="function_calling").invoke(QUESTION)
    assert isinstance(answer, Capital)
    jsonschema.validate(answer.model_dump(), Capital.model_json_schema())


@pytest.mark.parametrize("tool_choice", ["required", "get_weather"])
def test_bind_tools(smollm2_tools_server, tool_choice):
    model = chat_model(smollm2_tools_server).bind_tools([get_weather], tool_choice=tool_choice)
    message = model.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]})


def test_bind_tools_streamed(smollm2_tools_server):
    model = chat_model(smollm2_tools_server).bind_tools([get_weather], tool_choice="required")
    merged = None
    for chunk in model.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    [call] = merged.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)

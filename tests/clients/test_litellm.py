"""litellm (its OpenAI-compatible provider) against the real instruct model: a pydantic
response_format and tool_choice "required" come back honoured, not ignored."""

from __future__ import annotations

import json
import os

import jsonschema
from pydantic import BaseModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the network
import litellm  # noqa: E402 - after the environment it reads at import


class Capital(BaseModel):
    country: str
    city: str


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}


def completion(server, **kwargs):
    return litellm.completion(model=f"openai/{server.model_name}",
                              api_base=f"{server.base_url}/v1", api_key="unused",
                              temperature=0, max_tokens=64, **kwargs)


def test_pydantic_response_format(smollm2_server):
    out = completion(smollm2_server, response_format=Capital, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    answer = Capital.model_validate_json(out.choices[0].message.content)
    assert answer.city == "Paris"


def test_tool_choice_required(smollm2_tools_server):
    out = completion(smollm2_tools_server, tool_choice="required", messages=[
        {"role": "user", "content": "What is the weather in Paris?"}], tools=[{
            "type": "function", "function": {"name": "get_weather",
                                             "description": "The weather in a city",
                                             "parameters": WEATHER_SCHEMA}}])
    [call] = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    assert out.choices[0].finish_reason == "tool_calls"

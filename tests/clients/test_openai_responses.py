"""The Responses API with the official clients against the real instruct model: the openai
SDK's responses.create (text; a required function call, streamed and not; a function call's
output sent back) and an openai-agents Agent whose function tool is called and answered (the
agents SDK speaks the Responses API by default)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": WEATHER_SCHEMA}]


def test_text(smollm2_server):
    client = smollm2_server.openai()
    out = client.responses.create(model=smollm2_server.model_name, temperature=0,
                                  input="What is the capital of France?", max_output_tokens=48)
    assert "Paris" in out.output_text
    assert out.usage.input_tokens > 0 and out.usage.output_tokens > 0


def test_required_call_and_its_output(smollm2_tools_server):
    client = smollm2_tools_server.openai()
    name = smollm2_tools_server.model_name
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.responses.create(model=name, input=question, tools=TOOLS,
                                  tool_choice="required", temperature=0, max_output_tokens=64)
    call = next(item for item in out.output if item.type == "function_call")
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    follow_up = client.responses.create(
        model=name, tools=TOOLS, tool_choice="none", temperature=0, max_output_tokens=32,
        input=[*question, {"type": "function_call", "call_id": call.call_id,
                           "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "Sunny, 18 C"}])
    assert follow_up.output_text and not any(i.type == "function_call"
                                             for i in follow_up.output)


def test_required_call_streamed(smollm2_tools_server):
    client = smollm2_tools_server.openai()
    with client.responses.stream(model=smollm2_tools_server.model_name, tools=TOOLS,
                                 input="What is the weather in Paris?", tool_choice="required",
                                 temperature=0, max_output_tokens=64) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    call = next(item for item in final.output if item.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)


def test_an_agent_calls_its_tool(smollm2_tools_server):
    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"Sunny, 18 C in {city}"

    model = OpenAIResponsesModel(model=smollm2_tools_server.model_name,
                                 openai_client=smollm2_tools_server.async_openai())
    agent = Agent(name="weather", instructions="Use the tools.", tools=[get_weather],
                  model=model, model_settings=ModelSettings(tool_choice="required",
                                                            temperature=0, max_tokens=64))
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert cities and all(isinstance(c, str) and c for c in cities)
    assert isinstance(result.final_output, str) and result.final_output

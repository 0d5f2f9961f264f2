"""Request bodies of the OpenAI surface (pydantic, strict JSON types) and their translation into
SamplingParams. Unknown fields are ignored, except those that would change what a request means
and are not supported yet (UNSUPPORTED_FIELDS): those are a 400 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_LOGPROBS,
    SamplingParams,
    StructuredOutputsParams,
)

MAX_N = 128
MAX_STOP_STRINGS = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _OpenBody(_Body):
    """A body whose unknown fields are kept (in `model_extra`) to be checked against
    UNSUPPORTED_FIELDS."""

    model_config = ConfigDict(extra="allow", strict=True)


def _given(value: Any) -> bool:
    return value not in (None, False, "", [], {})


# Fields of OpenAI's or vLLM's API that change what a request means, and when they do. A request
# that uses one gets a 400 naming it (never a silent answer to another question).
UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "functions": _given,
    "function_call": lambda v: v not in (None, "none", "auto"),
    "guided_whitespace_pattern": _given,
    "echo": _given,  # chat's (vLLM): completions declare their own
    "continue_final_message": _given,
    "chat_template": _given,
    "chat_template_kwargs": _given,
    "documents": _given,
    "bad_words": _given,
    "allowed_token_ids": _given,
    "logits_processors": _given,
    "use_beam_search": _given,
    "truncate_prompt_tokens": lambda v: v is not None,
    "return_tokens_as_token_ids": _given,
    "prompt_embeds": _given,
    "modalities": lambda v: v not in (None, ["text"]),
    "audio": _given,
    "web_search_options": _given,
}
MESSAGE_UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "function_call": _given, "audio": _given,
}


def unsupported_field(body: BaseModel,
                      table: dict[str, Callable[[Any], bool]] = UNSUPPORTED_FIELDS) -> str | None:
    """The first unknown field of `body` that would change its meaning."""
    return next((name for name, value in (body.model_extra or {}).items()
                 if name in table and table[name](value)), None)


class StreamOptions(_Body):
    include_usage: bool = False


JsonSchema = dict[str, Any] | str  # an object, or its JSON text


class JsonSchemaFormat(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# vLLM's `structured_outputs` fields that change what a request means and are not supported.
STRUCTURED_OUTPUTS_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "whitespace_pattern": _given, "structural_tag": _given,
    "disable_additional_properties": _given,
}


class StructuredOutputsBody(_OpenBody):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    json_: Annotated[JsonSchema | None, Field(alias="json")] = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # one backend: nothing to fall back to


class _SamplingFields(_OpenBody):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extensions)."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs (OpenAI's, vLLM's, and vLLM's older names)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: JsonSchema | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1)] | None = None
    guided_decoding_backend: str | None = None  # vLLM's old per-request backend: xgrammar here

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, "
                             f"got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, value: StreamOptions | None,
                              info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # `stream` is validated first
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None,
                           structured_outputs: StructuredOutputsParams | None = None
                           ) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(
            n=self.n,
            temperature=temperature,
            top_p=max(top_p, 1e-9),  # OpenAI allows 0: keep only the most likely token
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()} or None,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens if max_tokens is None else min(self.min_tokens,
                                                                      max_tokens),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_outputs,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: only with echo (scores the prompt)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # vLLM's
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a token-id prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top-N the engine computes at each prompt position: for `echo` with `logprobs`, and
        for `prompt_logprobs`."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs)
                  if n is not None]
        return max(wanted, default=None)


class TextPart(_Body):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(_Body):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_OpenBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # vLLM's
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_OpenBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# Fields of the Responses API that change what a request means and are not supported: a 400
# naming them. (`store` is checked on its own: only `true` is refused, nothing is stored.)
RESPONSES_UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "previous_response_id": _given, "conversation": _given, "background": _given,
    "prompt": _given, "include": _given, "reasoning": _given, "max_tool_calls": _given,
    "top_logprobs": _given, "truncation": lambda v: v not in (None, "disabled"),
    "context_management": _given,
}


class ResponsesFunctionTool(_Body):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(_Body):
    type: Literal["function"]
    name: FunctionName


class ResponsesTextFormat(_Body):
    """`text.format`: OpenAI's response_format with the schema fields flattened."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponsesText(_Body):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(_OpenBody):
    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedToolChoice | None = None
    parallel_tool_calls: bool = True
    text: ResponsesText | None = None
    user: str | None = None

"""What completions and chat completions share: request checks, per-choice text state,
merging several prompts' streams, SSE framing, and aborting when the client goes away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.api.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenTexts
from server.api.errors import APIError, bad_request
from server.api.protocol import (
    MESSAGE_UNSUPPORTED_FIELDS,
    ChatMessage,
    _SamplingFields,
    unsupported_field,
)
from server.api.structured_outputs import constraint_for
from server.api.tools.parsers import parser_for_template
from server.engine.protocol import EngineClient, EngineNotReadyError, ModelInfo, RequestStream
from server.outputs import EngineCoreOutput, SampleResult
from server.sampling_params import SamplingParams, StructuredOutputsParams


@dataclass
class ServingContext:
    """What a handler needs besides the request: the engine, the tokenizer (the API side owns
    tokenization; set by the app once loaded) and the server's settings."""

    engine: EngineClient
    served_model_name: str
    max_queued_requests: int
    metrics: Any = None
    chat_template: str | None = None
    tokenizer: Any = None
    tool_call_parser: str = "auto"  # a parser's name, "auto" (from the template) or "none"

    _token_texts: TokenTexts | None = None

    @property
    def template(self) -> str | None:
        """The chat template in use: the server's, else the tokenizer's."""
        return self.chat_template or getattr(self.tokenizer, "chat_template", None)

    @property
    def tool_parser_name(self) -> str | None:
        if self.tool_call_parser == "auto":
            return parser_for_template(self.template)
        return None if self.tool_call_parser == "none" else self.tool_call_parser

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and self.engine.alive

    @property
    def model(self) -> ModelInfo:
        info = self.engine.model_info
        if info is None:
            raise APIError(503, "the engine is not ready", type="service_unavailable_error")
        return info

    def token_text(self, token_id: int) -> str:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts(token_id)

    def check_model(self, body: _SamplingFields) -> None:
        if body.model is not None and body.model != self.served_model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves "
                           f"'{self.served_model_name}'", param="model", code="model_not_found")

    def check_ready(self) -> None:
        if not self.ready:
            raise APIError(503, "the engine is not ready", type="service_unavailable_error")

    def check_num_completions(self, num_completions: int, param: str) -> None:
        """A request whose completions (prompts x n) could never fit in the waiting queue is a
        400 naming `param`, before any of its prompts is tokenized."""
        if num_completions > self.max_queued_requests:
            raise bad_request(f"the request asks for {num_completions} completions (prompts x "
                              f"n); this server queues at most {self.max_queued_requests}",
                              param=param)

    def check_queue(self, num_requests: int) -> None:
        """Room in the waiting queue for `num_requests` engine requests (one per completion)."""
        if self.engine.num_waiting + num_requests > self.max_queued_requests:
            raise APIError(429, f"the waiting queue is full ({self.max_queued_requests} "
                           "requests); retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = self.model.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range [0, {vocab})", param=param)

    def check_token_fields(self, body: _SamplingFields) -> None:
        """Token ids in logit_bias keys and stop_token_ids must exist in the vocabulary."""
        if body.logit_bias:
            self.check_token_ids([int(k) for k in body.logit_bias], "logit_bias")
        if body.stop_token_ids:
            self.check_token_ids(body.stop_token_ids, "stop_token_ids")

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None,
                      prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> None:
        """Raise 400 context_length_exceeded when the prompt (plus explicit max_tokens) is
        longer than the model's context."""
        max_model_len = self.model.max_model_len
        if num_prompt_tokens >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {num_prompt_tokens} tokens, leaving no room for output.",
                param=prompt_param,
                code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} "
                f"in the prompt, {max_tokens} for the completion). Please reduce the prompt "
                f"or {max_tokens_param}.", param=max_tokens_param,
                code="context_length_exceeded")


    def submit(self, request_id: str, prompt_ids: list[int],
               params: SamplingParams) -> RequestStream:
        try:
            return self.engine.generate(request_id, prompt_ids, params)
        except EngineNotReadyError:
            raise APIError(503, "the engine is not ready",
                           type="service_unavailable_error") from None


def check_supported(body: BaseModel, messages: list[ChatMessage] | None = None) -> None:
    """A 400 naming the first field of the request (or of one of its messages) that would
    change what it means and is not supported yet."""
    name = unsupported_field(body)
    if name is not None:
        raise bad_request(f"'{name}' is not supported yet", param=name,
                          code="unsupported_parameter")
    for i, message in enumerate(messages or []):
        name = unsupported_field(message, MESSAGE_UNSUPPORTED_FIELDS)
        if name is not None:
            raise bad_request(f"'messages[{i}].{name}' is not supported yet", param="messages",
                              code="unsupported_parameter")


def top_entries(sample: SampleResult, num: int) -> list[tuple[int, float]]:
    """The `num` most likely (token id, logprob) of a sample, best first."""
    return sorted((sample.top_logprobs or {}).items(), key=lambda kv: -kv[1])[:num]


def vllm_prompt_logprobs(ctx: ServingContext, scored: list[SampleResult],
                          num: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then token id -> logprob,
    rank and text, for the prompt's own token and the top `num`."""
    out: list[dict | None] = [None]
    for sample in scored:
        entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": ctx.token_text(t)}
                 for rank, (t, lp) in enumerate(top_entries(sample, num), start=1)}
        entry[str(sample.token_id)] = {"logprob": sample.logprob, "rank": sample.rank,
                                       "decoded_token": ctx.token_text(sample.token_id)}
        out.append(entry)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params_for(body: _SamplingFields, max_tokens: int | None,
                        logprobs: int | None, explicit_max_tokens: bool,
                        prompt_logprobs: int | None = None,
                        implied_constraint: tuple[str, StructuredOutputsParams] | None = None
                        ) -> SamplingParams:
    """`max_tokens` is the output cap in effect; `explicit_max_tokens` whether the client set it
    (min_tokens above a default cap is clipped to it, above the client's own is a 400).
    `implied_constraint`: (field, constraint) a field other than the structured-outputs ones
    asks for (tool_choice)."""
    if explicit_max_tokens and max_tokens is not None and body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) must be <= max_tokens "
                          f"({max_tokens})", param="min_tokens")
    structured_outputs = constraint_for(body, implied_constraint)
    try:
        return body.to_sampling_params(max_tokens, logprobs, prompt_logprobs, structured_outputs)
    except ValueError as e:
        raise bad_request(str(e)) from None


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[SampleResult]
    finish_reason: str | None


@dataclass
class ChoiceState:
    """Text, tokens and logprobs of one choice, built incrementally from engine outputs."""

    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleResult] = field(default_factory=list)
    prompt_logprobs: list[SampleResult] | None = None  # prompt tokens after the first
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or the stop string that ended it
    tracker: LatencyTracker | None = None

    def add(self, out: EngineCoreOutput) -> Delta:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if self.tracker is not None:
            self.tracker.on_tokens(len(out.new_token_ids))
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        final = out.finished
        text = self.matcher.add(self.detokenizer.add(out.new_token_ids, final=final),
                                final=final)
        if self.matcher.stopped_by is not None:
            self.finish_reason, self.stop_reason = "stop", self.matcher.stopped_by
        elif final:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.finish_reason is not None and self.tracker is not None:
            self.tracker.on_finish(self.finish_reason)
            self.tracker = None
        self.text += text
        return Delta(text, list(out.new_token_ids), list(out.new_logprobs), self.finish_reason)

    def end_at_prompt(self, out: EngineCoreOutput) -> Delta:
        """`max_tokens: 0` with echo: the prompt was scored; the engine's one sampled token is
        no part of the answer."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = "length"
        if self.tracker is not None:
            self.tracker.on_finish(self.finish_reason)
            self.tracker = None
        return Delta("", [], [], self.finish_reason)


def make_choices(ctx: ServingContext, body: _SamplingFields, prompt_ids: list[int],
                 first_index: int, skip_special_tokens: bool) -> list[ChoiceState]:
    return [ChoiceState(first_index + j,
                        IncrementalDetokenizer(ctx.tokenizer, prompt_ids, skip_special_tokens),
                        StopStringMatcher(body.stop_strings, body.include_stop_str_in_output),
                        tracker=LatencyTracker(ctx.metrics))
            for j in range(body.n)]


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, EngineCoreOutput]]:
    """Interleave several requests' outputs as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the request's engine streams once the response ends, however it ends (also when
    the client left before the body was iterated at all)."""

    def __init__(self, content, streams: list[RequestStream]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self._streams)


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run a non-streaming handler's work, cancelling it (and so aborting its requests) as
    soon as the client disconnects."""

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the cancel land
    if task.cancelled():
        raise APIError(499, "client disconnected", code="client_closed_request")
    return task.result()


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


class LatencyTracker:
    """Latency metrics of one choice: time to first token, between tokens, end to end."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None

    def on_tokens(self, count: int) -> None:
        if self.metrics is None or not count:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def on_finish(self, finish_reason: str) -> None:
        if self.metrics is not None:
            self.metrics.e2e.observe(time.monotonic() - self.start)
            self.metrics.on_finished(finish_reason)

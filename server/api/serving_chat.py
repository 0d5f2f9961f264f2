"""POST /v1/chat/completions (the tokenizer's chat template)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.errors import APIError, bad_request
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.serving_common import (
    ChoiceState,
    ClosingStreamingResponse,
    ServingContext,
    check_supported,
    make_choices,
    new_id,
    sampling_params_for,
    sse,
    top_entries,
    until_disconnected,
    usage,
    vllm_prompt_logprobs,
)
from server.api.tools.extract import CallDelta
from server.api.tools.plan import ToolPlan, plan_tools
from server.outputs import SampleResult


def _arguments(text: str) -> object:
    """A call's arguments for the template: the object (templates write it with tojson), or
    the text as it came when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _conversation(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        entry: dict = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation (and its tools) through the chat template."""
    tokenizer = ctx.tokenizer
    template = ctx.template
    if not template:
        raise bad_request(f"the model '{ctx.served_model_name}' has no chat template; use "
                          "/v1/completions or start the server with --chat-template",
                          param="messages", code="chat_template_missing")
    for i, m in enumerate(messages):
        if m.role == "tool" and m.tool_call_id is None:
            raise bad_request(f"messages[{i}] has role 'tool' but no tool_call_id",
                              param="messages")
    conversation = _conversation(messages)

    def render(turns: list[dict], with_tools: list[dict] | None) -> str:
        try:
            return tokenizer.apply_chat_template(turns, chat_template=template,
                                                 tools=with_tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template can reject a conversation (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {e}",
                              param="messages") from None

    # A template that leaves out the tools, or the calls in the conversation, would have the
    # model answer without them: a 400 rather than a silent answer to another question.
    text = render(conversation, tools)
    fix = "start the server with a --chat-template that does (e.g. chatml-tools)"
    if tools and text == render(conversation, None):
        raise bad_request(f"the chat template of '{ctx.served_model_name}' does not render "
                          f"tools; {fix}", param="tools")
    if any("tool_calls" in turn for turn in conversation):
        plain = [{k: v for k, v in turn.items() if k != "tool_calls"} for turn in conversation]
        if text == render(plain, tools):
            raise bad_request(f"the chat template of '{ctx.served_model_name}' does not render "
                              f"the assistant's tool_calls; {fix}", param="messages")
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_entry(ctx: ServingContext, token_id: int, logprob: float | None) -> dict:
    token = ctx.token_text(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(ctx: ServingContext, samples: list[SampleResult], num_top: int) -> dict:
    content = []
    for sample in samples:
        entry = _token_entry(ctx, sample.token_id, sample.logprob)
        entry["top_logprobs"] = [_token_entry(ctx, t, lp)
                                 for t, lp in top_entries(sample, num_top)]
        content.append(entry)
    return {"content": content}


def start_chat(ctx: ServingContext, body: ChatCompletionRequest) -> ChatRun:
    """Check a chat request, render its prompt and submit it; the Responses API starts its
    requests here too."""
    ctx.check_ready()
    ctx.check_model(body)
    check_supported(body, body.messages)
    ctx.check_token_fields(body)
    ctx.check_num_completions(body.n, "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    plan = plan_tools(body, ctx.tool_parser_name)
    prompt_ids = render_chat(ctx, body.messages, body.add_generation_prompt, plan.tools)
    plan.check()
    max_tokens = body.requested_max_tokens
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    ctx.check_context(len(prompt_ids), max_tokens, prompt_param="messages",
                      max_tokens_param=max_tokens_param)
    num_top = body.top_logprobs or 0
    implied = ("tool_choice" if plan.mode in ("named", "required") else "tools",
               plan.constraint) if plan.constraint is not None else None
    params = sampling_params_for(body, max_tokens, num_top if body.logprobs else None,
                                 explicit_max_tokens=True, prompt_logprobs=body.prompt_logprobs,
                                 implied_constraint=implied)
    ctx.check_queue(body.n)
    if ctx.metrics is not None:
        ctx.metrics.on_prompt(len(prompt_ids))
    return ChatRun(ctx, body, prompt_ids, params, num_top, plan)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest,
                                 request: Request):
    chat = start_chat(ctx, body)
    if body.stream:
        return ClosingStreamingResponse(chat.stream(), [chat.request_stream])
    try:
        return JSONResponse(await until_disconnected(request, chat.complete()))
    finally:
        chat.request_stream.close()


@dataclass
class Piece:
    """What one engine output adds to a choice's message: content, tool-call deltas, logprobs."""

    content: str
    calls: list[CallDelta]
    logprobs: list[SampleResult]
    finish_reason: str | None


class ChatRun:
    """One submitted chat request: its choices' text, tool calls and the response bodies."""

    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest, prompt_ids: list[int],
                 params, num_top: int, plan: ToolPlan) -> None:
        self.ctx, self.body, self.prompt_ids, self.params = ctx, body, prompt_ids, params
        self.num_top = num_top
        self.plan = plan
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        skip_special = body.skip_special_tokens and not plan.keeps_special_tokens
        self.choices = make_choices(ctx, body, prompt_ids, 0, skip_special)
        self.tools = [plan.extractor() for _ in self.choices]
        self._contents: list[list[str]] = [[] for _ in self.choices]  # content pieces, whole
        # With special tokens decoded for a parser, the end-of-text token is no content.
        self._eos_text = (getattr(ctx.tokenizer, "eos_token", None) or ""
                          if plan.keeps_special_tokens else "")
        # Submitted now (see _Prepared in serving_completion).
        self.request_stream = ctx.submit(self.id, prompt_ids, params)

    def usage(self) -> dict:
        return usage(len(self.prompt_ids), sum(len(c.token_ids) for c in self.choices))

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        tools = self.tools[index]
        return "tool_calls" if reason == "stop" and tools is not None and tools.calls else reason

    async def pieces(self) -> AsyncIterator[tuple[ChoiceState, Piece]]:
        stream = self.request_stream
        async for out in stream:
            choice = self.choices[out.index]
            delta = choice.add(out)
            if choice.matcher.stopped_by is not None:
                stream.finish_choice(out.index)
            tools = self.tools[out.index]
            content, calls = delta.text, []
            if tools is not None:
                final = delta.finish_reason is not None
                if self._eos_text and final:
                    content = content.removesuffix(self._eos_text)
                content, calls = tools.feed(content, final)
            yield choice, Piece(content, calls, delta.logprobs,
                                 self.finish_reason(out.index, delta.finish_reason))

    def _message(self, choice: ChoiceState) -> dict:
        tools = self.tools[choice.index]
        if tools is None:
            return {"role": "assistant", "content": choice.text}
        content = "".join(self._contents[choice.index]).strip()
        message: dict = {"role": "assistant", "content": content or None}
        if tools.calls:
            message["tool_calls"] = tools.calls
        elif not content:
            message["content"] = ""
        return message

    async def complete(self) -> dict:
        async for choice, piece in self.pieces():
            self._contents[choice.index].append(piece.content)
        choices = [{
            "index": c.index,
            "message": self._message(c),
            "logprobs": (_logprobs(self.ctx, c.logprobs, self.num_top) if self.body.logprobs
                         else None),
            "finish_reason": self.finish_reason(c.index, c.finish_reason),
            "stop_reason": c.stop_reason,
        } for c in self.choices]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.ctx.served_model_name, "choices": choices, "usage": self.usage(),
                **self._prompt_logprobs(self.choices[0])}

    def _prompt_logprobs(self, choice: ChoiceState) -> dict:
        """vLLM's top-level `prompt_logprobs` (the same for every choice), when asked."""
        if self.body.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": vllm_prompt_logprobs(self.ctx, choice.prompt_logprobs or [],
                                                        self.body.prompt_logprobs)}

    def _chunk(self, choices: list[dict], **extra) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.ctx.served_model_name, "choices": choices, **extra})

    async def stream(self) -> AsyncIterator[str]:
        try:
            for choice in self.choices:
                yield self._chunk([{"index": choice.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}])
            prompt_logprobs_sent = self.body.prompt_logprobs is None
            async for choice, piece in self.pieces():
                extra = {}
                if not prompt_logprobs_sent:  # with the first output, in its chunk
                    extra, prompt_logprobs_sent = self._prompt_logprobs(choice), True
                elif (not piece.content and not piece.calls and piece.finish_reason is None
                      and not self.body.logprobs):
                    continue
                delta: dict = {"content": piece.content} if piece.content else {}
                if piece.calls:  # never an empty tool_calls list
                    delta["tool_calls"] = [c.to_dict() for c in piece.calls]
                yield self._chunk([{
                    "index": choice.index,
                    "delta": delta,
                    "logprobs": (_logprobs(self.ctx, piece.logprobs, self.num_top)
                                 if self.body.logprobs else None),
                    "finish_reason": piece.finish_reason,
                }], **extra)
            if self.body.include_usage:
                yield self._chunk([], usage=self.usage())
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - reported in-band once streaming began
            yield sse(APIError(500, f"internal server error: {e}", type="server_error").body())
        yield sse("[DONE]")

"""POST /v1/responses: OpenAI's Responses API over the chat pipeline. `instructions` and the
input items (messages, function calls and their outputs) become a chat conversation; `tools`,
`tool_choice` and `text.format` become chat's tools and response_format; the answer is output
items (a message, function calls), whole or as the typed event stream. Nothing is stored:
`store: true`, `previous_response_id` and the other fields in RESPONSES_UNSUPPORTED_FIELDS are
a 400 naming the field."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api.errors import APIError, bad_request, from_validation_error
from server.api.protocol import (
    RESPONSES_UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    ResponsesRequest,
    unsupported_field,
)
from server.api.serving_chat import ChatRun, start_chat
from server.api.serving_common import (
    ClosingStreamingResponse,
    ServingContext,
    new_id,
    until_disconnected,
)

# Chat's names for the fields a Responses request gave under its own names.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}] of type {kind!r} is not supported yet "
                              f"(text parts only)", param="input", code="unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: ResponsesRequest) -> list[dict]:
    """The conversation: instructions as the system message, then the input items, with
    consecutive function calls joined into one assistant turn."""
    messages: list[dict] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) \
        else body.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant",
                                  param="input")
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_request(f"{where} of type {kind!r} is not supported yet", param="input",
                              code="unsupported_parameter")
    return messages


def _chat_body(body: ResponsesRequest) -> ChatCompletionRequest:
    fields: dict[str, Any] = {
        "model": body.model, "messages": _messages(body), "stream": body.stream,
        "max_tokens": body.max_output_tokens, "temperature": body.temperature,
        "top_p": body.top_p, "user": body.user, "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": t.model_dump(
            exclude_none=True, exclude={"type"})} for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        fields["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate(fields, strict=False)
    except ValidationError as e:
        raise _renamed(from_validation_error(e)) from None


def _renamed(error: APIError) -> APIError:
    param = error.param
    if param is not None:
        head = param.split("[")[0]
        error.param = _PARAMS.get(param, _PARAMS.get(head, param))
    return error


def check_request(body: ResponsesRequest) -> None:
    name = unsupported_field(body, RESPONSES_UNSUPPORTED_FIELDS)
    if name is not None:
        raise bad_request(f"'{name}' is not supported yet", param=name,
                          code="unsupported_parameter")
    if body.store:
        raise bad_request("responses are not stored here; set store to false", param="store",
                          code="unsupported_parameter")


class _Response:
    """The Responses view of one chat run: output items built from its pieces."""

    def __init__(self, ctx: ServingContext, body: ResponsesRequest, chat: ChatRun) -> None:
        self.ctx, self.body, self.chat = ctx, body, chat
        self.id = _item_id("resp")
        self.created = int(time.time())
        self.items: list[dict] = []  # output items, in order
        self.sequence = 0

    def response(self, status: str) -> dict:
        body = self.body
        fmt = (body.text.format.model_dump(by_alias=True, exclude_none=True)
               if body.text is not None and body.text.format is not None else {"type": "text"})
        usage = self.chat.usage()
        tool_choice = body.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "model": self.ctx.served_model_name, "output": self.items,
            "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "instructions": body.instructions, "metadata": body.metadata or {},
            "temperature": body.temperature, "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": (tool_choice if isinstance(tool_choice, str) or tool_choice is None
                            else tool_choice.model_dump()) or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "text": {"format": fmt}, "store": False, "truncation": "disabled",
            "usage": None if status == "in_progress" else {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]},
            "user": body.user,
            **({"completed_at": int(time.time())} if status != "in_progress" else {}),
        }

    def status(self) -> str:
        """The response's, and its message's: cut by max_output_tokens, it is incomplete."""
        return "incomplete" if self.chat.choices[0].finish_reason == "length" else "completed"

    async def complete(self) -> dict:
        text = ""
        async for _, piece in self.chat.pieces():
            text += piece.content
        tools = self.chat.tools[0]
        calls = tools.calls if tools is not None else []
        text = text.strip() if calls else text
        if text or not calls:
            self.items.append(_message_item(_item_id("msg"), text,
                                            self.status()))
        for call in calls:
            self.items.append(_call_item(call["id"], call["function"]["name"],
                                         call["function"]["arguments"], "completed"))
        return self.response(self.status())

    def _event(self, kind: str, **fields) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    async def stream(self) -> AsyncIterator[str]:
        events = _EventWriter(self)
        try:
            yield self._event("response.created", response=self.response("in_progress"))
            yield self._event("response.in_progress", response=self.response("in_progress"))
            async for _, piece in self.chat.pieces():
                if piece.content:
                    for event in events.text(piece.content):
                        yield event
                for call in piece.calls:
                    for event in events.call(call):
                        yield event
            for event in events.close():
                yield event
            status = self.status()
            yield self._event(f"response.{status}", response=self.response(status))
        except APIError as e:
            yield self._event("error", code=e.code or e.type, message=e.message, param=e.param)
        except Exception as e:  # noqa: BLE001 - reported in-band once streaming began
            yield self._event("error", code="server_error",
                              message=f"internal server error: {e}", param=None)


def _item_id(prefix: str) -> str:
    return new_id(prefix).replace("-", "_")  # OpenAI's ids: resp_..., msg_...


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status != "in_progress" else []}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": "fc_" + call_id.removeprefix("call_"),
            "call_id": call_id, "name": name, "arguments": arguments, "status": status}


class _EventWriter:
    """The typed events of the output items as pieces arrive: a message item for text, a
    function_call item per call, each opened, filled by deltas, and closed."""

    def __init__(self, response: _Response) -> None:
        self.r = response
        self.open: dict | None = None  # the item being written
        self.buffer = ""  # its text or arguments so far
        self.blank = ""  # whitespace that would open a message: kept until text follows it

    def _begin(self, item: dict) -> str:
        self.open, self.buffer = item, ""
        self.r.items.append(item)
        return self.r._event("response.output_item.added", output_index=len(self.r.items) - 1,
                             item=dict(item))

    def text(self, delta: str) -> list[str]:
        out: list[str] = []
        if self.open is None or self.open["type"] != "message":
            if not (self.blank + delta).strip():
                self.blank += delta
                return out
            delta, self.blank = self.blank + delta, ""
            out += self.close()
            out.append(self._begin(_message_item(_item_id("msg"), "",
                                                 "in_progress")))
            out.append(self.r._event("response.content_part.added", item_id=self.open["id"],
                                     output_index=len(self.r.items) - 1, content_index=0,
                                     part=_text_part("")))
        assert self.open is not None
        self.buffer += delta
        out.append(self.r._event("response.output_text.delta", item_id=self.open["id"],
                                 output_index=len(self.r.items) - 1, content_index=0,
                                 delta=delta, logprobs=[]))
        return out

    def call(self, delta) -> list[str]:
        out = []
        self.blank = ""
        if delta.name is not None:
            out += self.close()
            out.append(self._begin(_call_item(delta.id, delta.name, "", "in_progress")))
        assert self.open is not None and self.open["type"] == "function_call"
        if delta.arguments:
            self.buffer += delta.arguments
            out.append(self.r._event("response.function_call_arguments.delta",
                                     item_id=self.open["id"],
                                     output_index=len(self.r.items) - 1, delta=delta.arguments))
        return out

    def close(self) -> list[str]:
        item, index = self.open, len(self.r.items) - 1
        if item is None:
            return []
        self.open = None
        out = []
        if item["type"] == "message":
            out.append(self.r._event("response.output_text.done", item_id=item["id"],
                                     output_index=index, content_index=0, text=self.buffer,
                                     logprobs=[]))
            out.append(self.r._event("response.content_part.done", item_id=item["id"],
                                     output_index=index, content_index=0,
                                     part=_text_part(self.buffer)))
            item.update(_message_item(item["id"], self.buffer, self.r.status()))
        else:
            out.append(self.r._event("response.function_call_arguments.done",
                                     item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=self.buffer))
            item.update(arguments=self.buffer, status="completed")
        out.append(self.r._event("response.output_item.done", output_index=index,
                                 item=dict(item)))
        return out


async def create_response(ctx: ServingContext, body: ResponsesRequest, request: Request):
    check_request(body)
    chat_body = _chat_body(body)
    try:
        chat = start_chat(ctx, chat_body)
    except APIError as e:
        raise _renamed(e) from None
    response = _Response(ctx, body, chat)
    if body.stream:
        return ClosingStreamingResponse(response.stream(), [chat.request_stream])
    try:
        return JSONResponse(await until_disconnected(request, response.complete()))
    finally:
        chat.request_stream.close()


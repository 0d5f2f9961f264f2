"""POST /v1/chat/completions (the tokenizer's chat template)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

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
    until_disconnected,
    usage,
    vllm_prompt_logprobs,
)
from server.outputs import SampleResult


def render_chat(ctx: ServingContext, messages: list[ChatMessage],
                add_generation_prompt: bool) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template."""
    tokenizer = ctx.tokenizer
    template = ctx.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request(f"the model '{ctx.served_model_name}' has no chat template; use "
                          "/v1/completions or start the server with --chat-template",
                          param="messages", code="chat_template_missing")
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template,
                                             tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template can reject a conversation (e.g. role order)
        raise bad_request(f"the chat template rejected the messages: {e}",
                          param="messages") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_entry(ctx: ServingContext, token_id: int, logprob: float | None) -> dict:
    token = ctx.token_text(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(ctx: ServingContext, samples: list[SampleResult], num_top: int) -> dict:
    content = []
    for sample in samples:
        entry = _token_entry(ctx, sample.token_id, sample.logprob)
        tops = sorted((sample.top_logprobs or {}).items(), key=lambda kv: -kv[1])[:num_top]
        entry["top_logprobs"] = [_token_entry(ctx, t, lp) for t, lp in tops]
        content.append(entry)
    return {"content": content}


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest,
                                 request: Request):
    ctx.check_ready()
    ctx.check_model(body)
    check_supported(body, body.messages)
    ctx.check_token_fields(body)
    ctx.check_num_completions(body.n, "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    prompt_ids = render_chat(ctx, body.messages, body.add_generation_prompt)
    max_tokens = body.requested_max_tokens
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    ctx.check_context(len(prompt_ids), max_tokens, prompt_param="messages",
                      max_tokens_param=max_tokens_param)
    num_top = body.top_logprobs or 0
    params = sampling_params_for(body, max_tokens, num_top if body.logprobs else None,
                                 explicit_max_tokens=True, prompt_logprobs=body.prompt_logprobs)
    ctx.check_queue(body.n)
    if ctx.metrics is not None:
        ctx.metrics.on_prompt(len(prompt_ids))
    chat = _Chat(ctx, body, prompt_ids, params, num_top)
    if body.stream:
        return ClosingStreamingResponse(chat.stream(), [chat.request_stream])
    try:
        return JSONResponse(await until_disconnected(request, chat.complete()))
    finally:
        chat.request_stream.close()


class _Chat:
    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest, prompt_ids: list[int],
                 params, num_top: int) -> None:
        self.ctx, self.body, self.prompt_ids, self.params = ctx, body, prompt_ids, params
        self.num_top = num_top
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.choices = make_choices(ctx, body, prompt_ids, 0, body.skip_special_tokens)
        # Submitted now (see _Prepared in serving_completion).
        self.request_stream = ctx.submit(self.id, prompt_ids, params)

    def usage(self) -> dict:
        return usage(len(self.prompt_ids), sum(len(c.token_ids) for c in self.choices))

    async def _run(self) -> AsyncIterator[tuple[ChoiceState, object]]:
        stream = self.request_stream
        async for out in stream:
            choice = self.choices[out.index]
            delta = choice.add(out)
            if choice.matcher.stopped_by is not None:
                stream.finish_choice(out.index)
            yield choice, delta

    async def complete(self) -> dict:
        async for _ in self._run():
            pass
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": (_logprobs(self.ctx, c.logprobs, self.num_top) if self.body.logprobs
                         else None),
            "finish_reason": c.finish_reason,
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
            async for choice, delta in self._run():
                extra = {}
                if not prompt_logprobs_sent:  # with the first output, in its chunk
                    extra, prompt_logprobs_sent = self._prompt_logprobs(choice), True
                elif (not delta.text and delta.finish_reason is None
                      and not self.body.logprobs):
                    continue
                yield self._chunk([{
                    "index": choice.index,
                    "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": (_logprobs(self.ctx, delta.logprobs, self.num_top)
                                 if self.body.logprobs else None),
                    "finish_reason": delta.finish_reason,
                }], **extra)
            if self.body.include_usage:
                yield self._chunk([], usage=self.usage())
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - reported in-band once streaming began
            yield sse(APIError(500, f"internal server error: {e}", type="server_error").body())
        yield sse("[DONE]")

"""POST /v1/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.errors import APIError, bad_request
from server.api.protocol import CompletionRequest
from server.api.serving_common import (
    ChoiceState,
    ClosingStreamingResponse,
    ServingContext,
    check_supported,
    close_all,
    make_choices,
    merge_streams,
    new_id,
    sampling_params_for,
    sse,
    until_disconnected,
    usage,
)
from server.outputs import SampleResult


class _Prepared:
    def __init__(self, ctx: ServingContext, body: CompletionRequest) -> None:
        ctx.check_ready()
        ctx.check_model(body)
        check_supported(body)
        ctx.check_token_fields(body)
        if body.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of must equal n (no server-side ranking)", param="best_of")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported yet",
                              param="echo")
        prompts = body.prompts()
        ctx.check_num_completions(len(prompts) * body.n, "n" if body.n > 1 else "prompt")
        explicit_max = "max_tokens" in body.model_fields_set and body.max_tokens is not None
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = list(ctx.tokenizer(prompt).input_ids)
                text = prompt
            else:
                ctx.check_token_ids(prompt, "prompt")
                ids, text = list(prompt), ctx.tokenizer.decode(prompt)
            if not ids:
                raise bad_request("the prompt is empty", param="prompt")
            ctx.check_context(len(ids), body.max_tokens if explicit_max else None)
            self.prompt_ids.append(ids)
            self.prompt_texts.append(text)
        self.params = sampling_params_for(body, body.max_tokens, body.logprobs, explicit_max)
        ctx.check_queue(len(self.prompt_ids) * body.n)
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.choices: list[ChoiceState] = []
        for i, ids in enumerate(self.prompt_ids):
            self.choices += make_choices(ctx, body, ids, i * body.n, body.skip_special_tokens)
        if ctx.metrics is not None:
            for ids in self.prompt_ids:
                ctx.metrics.on_prompt(len(ids))
        # Submit now, with no await since check_queue, so concurrent requests cannot all pass
        # the queue check before any of them is counted.
        self.request_streams = self.streams(ctx)

    def streams(self, ctx: ServingContext):
        return [ctx.submit(f"{self.id}-{i}", ids, self.params)
                for i, ids in enumerate(self.prompt_ids)]

    def usage(self) -> dict:
        return usage(sum(len(p) for p in self.prompt_ids),
                     sum(len(c.token_ids) for c in self.choices))


def _logprobs(ctx: ServingContext, samples: list[SampleResult], offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for sample in samples:
        token = ctx.token_text(sample.token_id)
        tokens.append(token)
        token_logprobs.append(sample.logprob)
        top.append({ctx.token_text(t): lp for t, lp in (sample.top_logprobs or {}).items()})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


async def create_completion(ctx: ServingContext, body: CompletionRequest,
                            request: Request):
    prep = _Prepared(ctx, body)
    if body.stream:
        return ClosingStreamingResponse(_stream(ctx, body, prep), prep.request_streams)
    try:
        return JSONResponse(await until_disconnected(request, _complete(ctx, body, prep)))
    finally:
        close_all(prep.request_streams)


async def _run(ctx: ServingContext, body: CompletionRequest, prep: _Prepared
               ) -> AsyncIterator[tuple[ChoiceState, object]]:
    streams = prep.request_streams
    async for i, out in merge_streams(streams):
        choice = prep.choices[i * body.n + out.index]
        if choice.finish_reason is not None:
            continue  # read ahead by merge_streams before a stop string ended the choice
        delta = choice.add(out)
        if choice.matcher.stopped_by is not None:
            streams[i].finish_choice(out.index)
        yield choice, delta


async def _complete(ctx: ServingContext, body: CompletionRequest, prep: _Prepared) -> dict:
    async for _ in _run(ctx, body, prep):
        pass
    choices = []
    for choice in prep.choices:
        prefix = prep.prompt_texts[choice.index // body.n] if body.echo else ""
        choices.append({
            "index": choice.index,
            "text": prefix + choice.text,
            "logprobs": (_logprobs(ctx, choice.logprobs, 0) if body.logprobs is not None
                         else None),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        })
    return {"id": prep.id, "object": "text_completion", "created": prep.created,
            "model": ctx.served_model_name, "choices": choices, "usage": prep.usage()}


async def _stream(ctx: ServingContext, body: CompletionRequest, prep: _Prepared
                  ) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        return sse({"id": prep.id, "object": "text_completion", "created": prep.created,
                    "model": ctx.served_model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]})

    offsets = {c.index: 0 for c in prep.choices}
    try:
        if body.echo:
            for choice in prep.choices:
                text = prep.prompt_texts[choice.index // body.n]
                offsets[choice.index] = len(text)
                yield chunk(choice.index, text, None, None)
        async for choice, delta in _run(ctx, body, prep):
            if not delta.text and delta.finish_reason is None and body.logprobs is None:
                continue
            logprobs = (_logprobs(ctx, delta.logprobs, offsets[choice.index])
                        if body.logprobs is not None else None)
            offsets[choice.index] += len(delta.text)
            yield chunk(choice.index, delta.text, logprobs, delta.finish_reason)
        if body.include_usage:
            yield sse({"id": prep.id, "object": "text_completion", "created": prep.created,
                       "model": ctx.served_model_name, "choices": [], "usage": prep.usage()})
    except APIError as e:
        yield sse(e.body())
    except Exception as e:  # noqa: BLE001 - reported in-band once streaming began
        yield sse(APIError(500, f"internal server error: {e}", type="server_error").body())
    yield sse("[DONE]")

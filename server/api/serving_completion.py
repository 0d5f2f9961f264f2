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
    top_entries,
    until_disconnected,
    usage,
    vllm_prompt_logprobs,
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
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1 (0 only with echo, to score the prompt)",
                              param="max_tokens")
        self.echo_only = body.max_tokens == 0
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
            ctx.check_context(len(ids), body.max_tokens or None if explicit_max else None)
            self.prompt_ids.append(ids)
            self.prompt_texts.append(text)
        # Echo only: the engine samples one token (a prefill always does), which is dropped.
        max_tokens = 1 if self.echo_only else body.max_tokens
        self.params = sampling_params_for(body, max_tokens, body.logprobs, explicit_max,
                                          body.num_prompt_logprobs)
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


def _echo_logprobs(ctx: ServingContext, prompt_ids: list[int], scored: list[SampleResult],
                   num: int) -> dict:
    """The echoed prompt's part of OpenAI's `logprobs`: the first token is unscored (null);
    each later one has its own logprob and, in `top_logprobs`, itself and the top `num`."""
    tokens = [ctx.token_text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top: list[dict | None] = [None]
    for sample in scored:
        entry = {ctx.token_text(t): lp for t, lp in top_entries(sample, num)}
        entry.setdefault(ctx.token_text(sample.token_id), sample.logprob)
        top.append(entry)
    return {"tokens": tokens, "token_logprobs": [None] + [s.logprob for s in scored],
            "top_logprobs": top, "text_offset": offsets}


def _choice_logprobs(ctx: ServingContext, body: CompletionRequest, prep: _Prepared,
                     choice: ChoiceState, offset: int) -> dict | None:
    """A whole choice's `logprobs`: with echo, the prompt's tokens, then the generated ones
    (whose offsets start after the echoed text)."""
    if body.logprobs is None:
        return None
    generated = _logprobs(ctx, choice.logprobs, offset)
    if not body.echo:
        return generated
    echoed = _echo_logprobs(ctx, prep.prompt_ids[choice.index // body.n],
                            choice.prompt_logprobs or [], body.logprobs)
    return {key: echoed[key] + generated[key] for key in echoed}


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
        delta = choice.end_at_prompt(out) if prep.echo_only else choice.add(out)
        if choice.matcher.stopped_by is not None:
            streams[i].finish_choice(out.index)
        yield choice, delta


async def _complete(ctx: ServingContext, body: CompletionRequest, prep: _Prepared) -> dict:
    async for _ in _run(ctx, body, prep):
        pass
    choices = []
    for choice in prep.choices:
        prefix = prep.prompt_texts[choice.index // body.n] if body.echo else ""
        entry = {
            "index": choice.index,
            "text": prefix + choice.text,
            "logprobs": _choice_logprobs(ctx, body, prep, choice, len(prefix)),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if body.prompt_logprobs is not None:
            entry["prompt_logprobs"] = vllm_prompt_logprobs(
                ctx, choice.prompt_logprobs or [], body.prompt_logprobs)
        choices.append(entry)
    return {"id": prep.id, "object": "text_completion", "created": prep.created,
            "model": ctx.served_model_name, "choices": choices, "usage": prep.usage()}


async def _stream(ctx: ServingContext, body: CompletionRequest, prep: _Prepared
                  ) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
              **extra) -> str:
        return sse({"id": prep.id, "object": "text_completion", "created": prep.created,
                    "model": ctx.served_model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason, **extra}]})

    offsets = {c.index: 0 for c in prep.choices}
    # Choices whose first chunk waits for the prompt's logprobs (they come with the first
    # output): the echo with its logprobs, or vLLM's prompt_logprobs.
    waiting = set()
    try:
        for choice in prep.choices:
            text = prep.prompt_texts[choice.index // body.n] if body.echo else ""
            offsets[choice.index] = len(text)
            if body.num_prompt_logprobs is not None:
                waiting.add(choice.index)
            elif body.echo:
                yield chunk(choice.index, text, None, None)
        async for choice, delta in _run(ctx, body, prep):
            if choice.index in waiting:
                waiting.discard(choice.index)
                prompt_index = choice.index // body.n
                extra = {} if body.prompt_logprobs is None else {
                    "prompt_logprobs": vllm_prompt_logprobs(
                        ctx, choice.prompt_logprobs or [], body.prompt_logprobs)}
                echoed = (_echo_logprobs(ctx, prep.prompt_ids[prompt_index],
                                         choice.prompt_logprobs or [], body.logprobs)
                          if body.echo and body.logprobs is not None else None)
                yield chunk(choice.index, prep.prompt_texts[prompt_index] if body.echo else "",
                            echoed, None, **extra)
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

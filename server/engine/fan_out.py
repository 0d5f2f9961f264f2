"""n > 1 completions of one request become n engine requests in the front end (the async client
and the offline LLM); the engine core only ever sees single completions. They share the
prompt's KV blocks through the prefix cache: blocks are entered in it when allocated, so a
sibling scheduled in the same step already hits them."""

from __future__ import annotations

from dataclasses import replace

from server.sampling_params import SamplingParams


def fan_out(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """(engine request id, its params) per completion, in completion order. A seeded request
    seeds completion i with seed + i, so that the completions differ."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{request_id}#{i}", replace(params, n=1,
                                          seed=None if params.seed is None else params.seed + i))
            for i in range(params.n)]

"""Operations on the real engine: concurrent streams match their solo runs, a client leaving
frees its KV blocks, an idle server exits 0 on SIGTERM. The waiting-queue limit (429),
disconnects aborting requests and SIGTERM with a stream in flight run over the fake engine
(tests/api)."""

from __future__ import annotations

import asyncio
import signal

import httpx
import openai
import pytest

from tests.http_client import assert_exits_cleanly

PROMPT = "Once upon a time"
C = "/v1/completions"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": PROMPT}]

GEN = "pagedserve:generation_tokens_total"


def _gen_tokens(server) -> float:
    return server.metrics()[f'{GEN}{{model_name="{server.model_name}"}}']


def _first_data_line(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended before its first chunk")


# ---------------------------------------------------------------------- 32 concurrent streams
CONCURRENT_PROMPTS = [PROMPT, "The little dog", "Tom and Sue", "One day, a bird",
                      "Lily saw a big", "The sun was", "Max liked to", "In the park,"]


def _collect_text(chunks: list[dict]) -> tuple[str, str | None, dict | None]:
    text, finish, usage = "", None, None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        for choice in c["choices"]:
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish, usage


def test_32_concurrent_streams_match_their_solo_runs(server):
    server.wait_idle()
    body = {"max_tokens": 16, "temperature": 0, "stream_options": {"include_usage": True}}
    alone = {}
    for p in CONCURRENT_PROMPTS:
        chunks, _ = server.stream(C, {"prompt": p, **body})
        alone[p] = _collect_text(chunks)

    prompts = CONCURRENT_PROMPTS * 4

    async def via_httpx(client: httpx.AsyncClient, prompt: str):
        async with client.stream("POST", C, json={"model": server.model_name, "prompt": prompt,
                                                  "stream": True, **body}) as r:
            assert r.status_code == 200
            raw = (await r.aread()).decode()
        return _collect_text(server.parse_sse(raw))

    async def via_sdk(client: openai.AsyncOpenAI, prompt: str):
        stream = await client.completions.create(
            model=server.model_name, prompt=prompt, stream=True, max_tokens=16, temperature=0,
            stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.model_dump(exclude_none=True)
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish, usage

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with server.async_client(limits=limits, timeout=120) as hc:
            sdk = server.async_openai(timeout=120)
            async with sdk:
                tasks = [via_httpx(hc, p) if i % 2 else via_sdk(sdk, p)
                         for i, p in enumerate(prompts)]
                return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == 32
    for prompt, (text, finish, usage) in zip(prompts, results):
        a_text, a_finish, a_usage = alone[prompt]
        assert text == a_text, prompt
        assert finish == a_finish, prompt
        assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} \
            == a_usage, prompt
    server.wait_idle()


# ---------------------------------------------------------------------- disconnects
# That a disconnect aborts the request in the engine is shown over the fake engine
# (tests/api/test_api_operations.py), where the request cannot end first. Here, on the real engine:
# whenever the client leaves, every block comes back and nothing is logged as an error.
LONG = {"max_tokens": 480, "ignore_eos": True, "temperature": 0.8, "stream": True}


@pytest.mark.parametrize("path,body", [
    (C, {"prompt": PROMPT}),
    (C, {"prompt": [PROMPT, "The dog"], "n": 2}),
    (CHAT, {"messages": MSGS}),
], ids=["completion", "completion-2-prompts-n2", "chat"])
def test_disconnect_mid_stream_frees_every_block(server, path, body):
    server.wait_idle()
    start = len(server.log_text())
    with server.client() as c:
        with c.stream("POST", path, json={"model": server.model_name, **body, **LONG}) as r:
            assert r.status_code == 200
            _first_data_line(r.iter_lines())
    server.wait_idle(timeout=30)
    log = server.log_text()[start:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_abandoned_request_is_not_a_server_error(server):
    """A client going away is not an internal error: no traceback, no 500, in the server's
    log."""
    server.wait_idle()
    start = len(server.log_text())
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}
    with server.client(timeout=0.1) as c:
        try:
            c.post(C, json=body)
        except httpx.ReadTimeout:
            pass
    server.wait_idle(timeout=30)
    log = server.log_text()[start:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# ---------------------------------------------------------------------- SIGTERM
# A stream in flight at SIGTERM is finished first: shown over the fake engine
# (tests/api/test_sigterm.py), where the stream cannot end before the signal.
def test_idle_server_exits_0_on_sigterm(fresh_server):
    s = fresh_server
    # While the engine loaded, /health said 503 (not ready), never anything else.
    assert set(s.health_statuses) <= {200, 503} and s.health_statuses[-1] == 200
    assert s.complete(prompt=PROMPT, max_tokens=4)["choices"][0]["finish_reason"]
    s.wait_idle()
    s.proc.send_signal(signal.SIGTERM)
    assert_exits_cleanly(s.proc, s.log_text)

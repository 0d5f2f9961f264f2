"""Operations: concurrency, the waiting-queue limit (429), client disconnects (streaming or
not) aborting their requests and freeing their KV blocks, and graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import openai
import pytest

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
# Nearly as long as the context allows (prompts, chat ones too, are under 32 tokens): about
# 1.5 s on an idle CPU.
LONG_TOKENS = 480
LONG = {"max_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0.8, "stream": True}


@pytest.mark.parametrize("path,body", [
    (C, {"prompt": PROMPT}),
    (C, {"prompt": [PROMPT, "The dog"], "n": 2}),
    (CHAT, {"messages": MSGS}),
], ids=["completion", "completion-2-prompts-n2", "chat"])
def test_disconnect_mid_stream_aborts_and_frees_blocks(server, path, body):
    server.wait_idle()
    before = _gen_tokens(server)
    with server.client() as c:
        with c.stream("POST", path, json={"model": server.model_name, **body, **LONG}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            _first_data_line(lines)
            _first_data_line(lines)
            running = server.metrics()["pagedserve:num_requests_running"]
            assert running >= 1
            assert server.metrics()["pagedserve:kv_cache_usage_perc"] > 0
        # leaving the block closes the connection mid-stream
    server.wait_idle(timeout=10)
    generated = _gen_tokens(server) - before
    n_streams = 4 if "n" in body else 1
    assert generated < LONG_TOKENS * n_streams, "the request ran to completion, not aborted"


def test_abandoned_non_streaming_request_is_aborted(server):
    server.wait_idle()
    before = _gen_tokens(server)
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": LONG_TOKENS, "n": 4,
            "ignore_eos": True}
    with server.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(C, json=body)
    server.wait_idle(timeout=10)
    generated = _gen_tokens(server) - before
    assert generated > 0, "the request never ran"
    assert generated < 4 * LONG_TOKENS, "the request ran to completion instead of aborting"
    with server.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(CHAT, json={"model": server.model_name, "messages": MSGS, "ignore_eos": True})
    server.wait_idle(timeout=10)


def test_abandoned_request_is_not_a_server_error(server):
    """A client going away is not an internal error: no traceback, no 500, in the server's
    log."""
    server.wait_idle()
    start = len(server.log_text())
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": LONG_TOKENS,
            "ignore_eos": True}
    with server.client(timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
        c.post(C, json=body)
    server.wait_idle(timeout=10)
    time.sleep(0.2)
    log = server.log_text()[start:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# ---------------------------------------------------------------------- 429
def _finished_total(server) -> float:
    """Requests that finished on their own (stop or length; aborted ones are not counted)."""
    return sum(v for k, v in server.metrics().items()
               if k.startswith("pagedserve:request_success_total{"))


PREMISE = ("the long request finished while the test still needed it running (the engine is "
           "faster than this scenario assumes), so this result says nothing about the server")


def _long_stream(server, path=C):
    body = ({"prompt": PROMPT} if path == C else {"messages": MSGS})
    return {"model": server.model_name, **body, "max_tokens": LONG_TOKENS, "ignore_eos": True,
            "stream": True}


def test_full_queue_is_429_with_retry_after(limits_server):
    s = limits_server  # --max-num-seqs 1 --max-queued-requests 1
    s.wait_idle()
    sdk = s.openai()
    with s.client() as ca, ca.stream("POST", C, json=_long_stream(s)) as running:
        assert running.status_code == 200
        # Keep the line iterator referenced: a dropped one closes the connection.
        lines = running.iter_lines()
        _first_data_line(lines)  # it runs: the one sequence slot is taken
        with s.client() as cb, cb.stream("POST", CHAT, json=_long_stream(s, CHAT)) as queued:
            assert queued.status_code == 200
            s.wait_metric("pagedserve:num_requests_waiting", lambda v: v == 1)
            finished = _finished_total(s)

            r = s.post(C, {"prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 429 or _finished_total(s) == finished, PREMISE
            error = s.assert_error(r, 429, param=None, type="rate_limit_error")
            assert r.headers["retry-after"].isdigit(), r.headers
            assert error["code"] is not None
            r = s.post(C, {"prompt": PROMPT, "max_tokens": 2, "stream": True})
            s.assert_error(r, 429, param=None)
            assert "retry-after" in r.headers
            r = s.post(CHAT, {"messages": MSGS, "max_tokens": 2})
            s.assert_error(r, 429, param=None)
            assert "retry-after" in r.headers
            with pytest.raises(openai.RateLimitError) as e:
                sdk.completions.create(model=s.model_name, prompt=PROMPT, max_tokens=2)
            assert e.value.status_code == 429
            assert s.metrics()["pagedserve:num_requests_running"] == 1
            assert _finished_total(s) == finished, PREMISE
        del lines
    s.wait_idle(timeout=10)
    out = s.complete(prompt=PROMPT, max_tokens=2)  # room again
    assert out["usage"]["completion_tokens"] <= 2


def _status_of_simultaneous_requests(server, path: str, body: dict, count: int) -> list[int]:
    """Send `count` requests on their own connections so that they complete at the same
    moment (all but the last byte first, then the last bytes together); return the statuses."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n")
    if server.api_key:
        head += f"Authorization: Bearer {server.api_key}\r\n"
    raw = head.encode() + b"\r\n" + payload
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(raw[:-1])
        time.sleep(0.1)  # the server has read everything but the last byte of each
        for sock in socks:
            sock.sendall(raw[-1:])
        statuses = []
        for sock in socks:
            first_line = sock.makefile("rb").readline().decode()
            statuses.append(int(first_line.split()[1]))
        return statuses
    finally:
        for sock in socks:
            sock.close()


def test_queue_limit_holds_for_simultaneous_requests(limits_server):
    """Requests arriving together while the only slot is busy and the queue holds one:
    exactly one of them is accepted (the check and the admission must not race)."""
    s = limits_server
    s.wait_idle()
    with s.client() as ca, ca.stream("POST", C, json=_long_stream(s)) as running:
        lines = running.iter_lines()
        _first_data_line(lines)
        assert s.metrics()["pagedserve:num_requests_running"] == 1
        finished = _finished_total(s)
        statuses = _status_of_simultaneous_requests(s, C, _long_stream(s), 6)
        premise_held = _finished_total(s) == finished
        del lines
    s.wait_idle(timeout=10)
    assert statuses.count(200) <= 2, statuses  # 1 running + 1 waiting at the very most
    assert premise_held, PREMISE
    assert sorted(statuses) == [200] + [429] * 5, statuses


# ---------------------------------------------------------------------- SIGTERM
def test_sigterm_finishes_in_flight_streams_then_exits_0(fresh_server):
    s = fresh_server
    # While the engine loaded, /health said 503 (not ready), never anything else.
    assert set(s.health_statuses) <= {200, 503} and s.health_statuses[-1] == 200
    body = {"model": s.model_name, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with s.client(timeout=60) as c, c.stream("POST", C, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = _first_data_line(lines)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # no new requests once shutting down
        try:
            late = httpx.post(s.base_url + C, json={"prompt": PROMPT, "max_tokens": 1},
                              timeout=5)
        except httpx.TransportError:
            late = None
        if late is not None:
            s.assert_error(late, 503, check_param=False)
        rest = [line for line in lines]
    raw = "\n\n".join([first] + [line for line in rest if line]) + "\n\n"
    chunks = s.parse_sse(raw)
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 200
    finish = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finish[-1] == "length"
    try:
        rc = s.proc.wait(timeout=30)
    except Exception:  # noqa: BLE001
        pytest.fail(f"the server did not exit within 30 s of SIGTERM:\n{s.log_tail()}")
    assert rc == 0, s.log_tail()
    assert json.loads(first[len("data: "):])["id"] == chunks[-1]["id"]

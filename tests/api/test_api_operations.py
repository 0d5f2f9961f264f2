"""Operations over the fake engine, where a request lasts exactly as many steps as the test lets
run: client disconnects (streaming or not) abort their requests, the waiting-queue limit (429),
stop strings ending one choice while the others go on."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest

from server.engine.fake import FakeEngineCore

PROMPT = "Once upon a time"
C = "/v1/completions"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": PROMPT}]
LONG = {"max_tokens": 400, "ignore_eos": True}


def _first_data_line(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended before its first chunk")


def _generated(server) -> float:
    key = f'pagedserve:generation_tokens_total{{model_name="{server.model_name}"}}'
    return server.metrics()[key]


def _idle(core: FakeEngineCore) -> bool:
    return not core.has_unfinished_requests()


# ---------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("path,body,num_requests", [
    (C, {"prompt": PROMPT}, 1),
    (C, {"prompt": [PROMPT, "The dog"], "n": 2}, 4),
    (CHAT, {"messages": MSGS}, 1),
], ids=["completion", "completion-2-prompts-n2", "chat"])
def test_disconnect_mid_stream_aborts_every_request(fake_server, path, body, num_requests):
    s, core = fake_server, fake_server.core
    core.pause()
    core.allow(3)
    with s.client() as c:
        with c.stream("POST", path, json={"model": s.model_name, **body, **LONG,
                                           "stream": True}) as r:
            assert r.status_code == 200
            # Held in a name: an abandoned iter_lines() generator, once collected, closes the
            # connection (httpcore closes its stream on GeneratorExit), which the server rightly
            # takes for a disconnect, maybe before the steps this test waits for.
            lines = r.iter_lines()
            _first_data_line(lines)
            s.wait_engine(lambda core: core.num_steps == 3)
        # leaving the block closes the connection mid-stream
    s.wait_engine(lambda core: _idle(core) and len(core.aborted) >= num_requests)
    assert sorted(core.aborted) == sorted(core.added)  # one engine request per completion
    assert len(core.added) == num_requests
    s.wait_metric("pagedserve:num_requests_running", lambda v: v == 0)


def test_abandoned_non_streaming_request_is_aborted(fake_server):
    s, core = fake_server, fake_server.core
    core.pause()
    core.allow(2)
    body = {"model": s.model_name, "prompt": PROMPT, "n": 4, **LONG}
    with s.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(C, json=body)
    s.wait_engine(lambda core: _idle(core) and len(core.aborted) == 4)
    assert core.num_steps == 2
    assert _generated(s) == 4 * 2  # it ran, then stopped with the client
    core.allow(1)
    with s.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(CHAT, json={"model": s.model_name, "messages": MSGS, **LONG})
    s.wait_engine(lambda core: _idle(core) and len(core.aborted) == 5)
    assert sorted(core.aborted) == sorted(core.added)


def test_abandoned_request_is_not_a_server_error(fake_server, caplog):
    """A client going away is not an internal error: nothing logged at WARNING or above."""
    s, core = fake_server, fake_server.core
    core.pause()
    caplog.set_level(logging.WARNING)
    with s.client(timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
        c.post(C, json={"model": s.model_name, "prompt": PROMPT, **LONG})
    s.wait_engine(lambda core: _idle(core) and core.aborted)
    time.sleep(0.1)  # let the handler's own teardown log, if it would
    bad = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not bad, [r.getMessage() for r in bad]


# ---------------------------------------------------------------------- 429
@pytest.fixture()
def queue_of_one(make_fake_server):
    """One running sequence and a waiting queue of one."""
    return make_fake_server(FakeEngineCore(max_num_seqs=1), max_queued_requests=1)


def _long_stream(server, path=C) -> dict:
    body = {"prompt": PROMPT} if path == C else {"messages": MSGS}
    return {"model": server.model_name, **body, **LONG, "stream": True}


def test_full_queue_is_429_with_retry_after(queue_of_one):
    s, core = queue_of_one, queue_of_one.core
    core.pause()
    core.allow(2)  # admits the first request; its text shows from the second token on
    sdk = s.openai()
    with s.client() as ca, ca.stream("POST", C, json=_long_stream(s)) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # referenced: a dropped iterator closes the connection
        _first_data_line(lines)
        with s.client() as cb, cb.stream("POST", CHAT, json=_long_stream(s, CHAT)) as queued:
            assert queued.status_code == 200
            s.wait_engine(lambda core: len(core.running) == 1 and len(core.waiting) == 1)

            r = s.post(C, {"prompt": PROMPT, "max_tokens": 2})
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
            assert len(core.added) == 2
        del lines
    s.wait_engine(_idle)
    core.resume()
    out = s.complete(prompt=PROMPT, max_tokens=2)  # room again
    assert out["usage"]["completion_tokens"] == 2


def _status_of_simultaneous_requests(server, path: str, body: dict, count: int) -> list[int]:
    """Send `count` requests on their own connections so that they complete at the same
    moment (all but the last byte first, then the last bytes together); return the statuses."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n")
    raw = head.encode() + b"\r\n" + payload
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
             for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(raw[:-1])
        for sock in socks:
            sock.sendall(raw[-1:])
        return [int(sock.makefile("rb").readline().decode().split()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_queue_limit_holds_for_simultaneous_requests(queue_of_one):
    """Requests arriving together while the only slot is busy and the queue holds one:
    exactly one of them is accepted (the check and the admission must not race)."""
    s, core = queue_of_one, queue_of_one.core
    core.pause()
    core.allow(2)
    with s.client() as ca, ca.stream("POST", C, json=_long_stream(s)) as running:
        lines = running.iter_lines()
        _first_data_line(lines)
        statuses = _status_of_simultaneous_requests(s, C, _long_stream(s), 6)
        del lines
    s.wait_engine(_idle)
    assert sorted(statuses) == [200] + [429] * 5, statuses


# ---------------------------------------------------------------------- stop strings
def test_stop_string_ends_one_choice_and_aborts_it_in_the_engine(fake_server):
    """The fake repeats the prompt: " Once upon a time Once upon ...". A stop string ends each
    choice on the API side and aborts that choice's sequence in the engine."""
    s, core = fake_server, fake_server.core
    core.pause()  # no step after the match: the aborts reach requests the engine still holds
    core.allow(_steps_until(s, PROMPT, "Once upon a time"))
    out = s.complete(prompt=PROMPT, max_tokens=30, n=2, stop=[" time"])
    assert [c["text"] for c in out["choices"]] == [" Once upon a"] * 2
    assert {c["finish_reason"] for c in out["choices"]} == {"stop"}
    assert {c["stop_reason"] for c in out["choices"]} == {" time"}
    s.wait_engine(_idle)
    assert sorted(core.aborted) == sorted(core.added) and len(core.added) == 2
    assert out["usage"]["completion_tokens"] < 2 * 30


def _steps_until(server, prompt: str, text: str) -> int:
    """How many of the fake's tokens (the prompt, repeated) it takes to produce `text`."""
    ids = server.tokenize(prompt)["tokens"]
    for k in range(1, len(ids) + 1):
        r = server.post("/detokenize", {"model": server.model_name, "tokens": ids[:k]})
        if text in r.json()["prompt"]:
            return k
    raise AssertionError(f"{text!r} is not in {prompt!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_batched_prompts_with_stop_strings_return(fake_server, stream):
    """Several prompts, each ended by a stop string at the last step the engine runs: the
    response ends (it used to wait forever for an output of a sequence the stop string had
    aborted)."""
    s, core = fake_server, fake_server.core
    prompts = ["The capital city of Japan is", "The capital city of Egypt is"]
    body = {"prompt": prompts, "max_tokens": 12, "stop": [" city", "."]}
    core.pause()
    core.allow(_steps_until(s, prompts[0], "The capital city"))  # no step after the match
    if stream:
        chunks, _ = s.stream(C, body)
        texts = {0: "", 1: ""}
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                    and c["choices"][0]["finish_reason"]]
    else:
        out = s.complete(**body)
        texts = {c["index"]: c["text"] for c in out["choices"]}
        finishes = [c["finish_reason"] for c in out["choices"]]
    assert texts == {0: " The capital", 1: " The capital"}
    assert finishes == ["stop", "stop"]
    s.wait_engine(_idle)


def test_a_dead_engine_turns_health_503_and_asks_the_server_to_stop(fake_server):
    s = fake_server
    stopped = threading.Event()
    s.app.state.on_engine_failure = stopped.set
    s.engine.error = RuntimeError("the loop broke")  # as run() records a loop that died
    assert stopped.wait(10)
    assert s.app.state.engine_failure == "the engine died: the loop broke"
    r = httpx.get(s.base_url + "/health", timeout=5)
    s.assert_error(r, 503, check_param=False)
    assert "the engine died" in r.json()["error"]["message"]


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(make_fake_server):
    """One running sequence at a time; the step that runs the marked prompt raises. That
    request gets a server_error (in the envelope, and in-band when streaming); the request
    waiting behind it, which the step did not run, completes; so do later ones."""
    marked = "BOOM " * 3
    core = FakeEngineCore(max_num_seqs=1, fail_when=None)
    s = make_fake_server(core)
    marked_ids = s.tokenize(marked)["tokens"]
    core.fail_when = lambda ids: list(ids) == marked_ids
    core.pause()
    results: dict[str, httpx.Response] = {}

    def post(name: str, prompt: str) -> None:
        results[name] = s.post(C, {"model": s.model_name, "prompt": prompt, "max_tokens": 3})

    threads = [threading.Thread(target=post, args=("marked", marked))]
    threads[0].start()
    s.wait_engine(lambda c: len(c.added) == 1)
    threads.append(threading.Thread(target=post, args=("normal", PROMPT)))
    threads[1].start()
    s.wait_engine(lambda c: len(c.added) == 2)
    core.resume()
    for t in threads:
        t.join(30)
    error = s.assert_error(results["marked"], 500, check_param=False, type="server_error")
    assert "internal engine error" in error["message"]
    assert results["normal"].status_code == 200, results["normal"].text
    assert results["normal"].json()["choices"][0]["finish_reason"] == "length"
    chunks, raw = s.stream(C, {"prompt": marked, "max_tokens": 3})
    assert '"server_error"' in raw and raw.rstrip().endswith("data: [DONE]")
    assert s.complete(prompt=PROMPT, max_tokens=2)["usage"]["completion_tokens"] == 2


class _LoopKiller(BaseException):
    """Escapes the engine loop's handling of failed steps: the loop itself dies."""


@pytest.mark.parametrize("stream", [False, True])
def test_requests_in_flight_get_a_prompt_503_when_the_engine_dies(make_fake_server, stream):
    waiting = "The cat sat"
    dying = "BOOM BOOM"
    core = FakeEngineCore(max_num_seqs=1)
    s = make_fake_server(core)
    dying_ids = s.tokenize(dying)["tokens"]
    repeat = core.token_fn

    def token_fn(prompt, i):
        if list(prompt) == dying_ids:
            raise _LoopKiller()
        return repeat(prompt, i)

    core.token_fn = token_fn
    core.pause()
    results: dict[str, object] = {}

    def post(name: str, prompt: str) -> None:
        body = {"model": s.model_name, "prompt": prompt, "max_tokens": 3, "stream": stream}
        results[name] = s.post(C, body)

    threads = [threading.Thread(target=post, args=("dying", dying)),
               threading.Thread(target=post, args=("waiting", waiting))]
    threads[0].start()
    s.wait_engine(lambda c: len(c.added) == 1)
    threads[1].start()
    s.wait_engine(lambda c: len(c.added) == 2)
    core.resume()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a request hung after the engine died"
    for name in ("dying", "waiting"):
        r = results[name]
        if stream:
            assert r.status_code == 200 and '"error"' in r.text, r.text
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            error = s.assert_error(r, 503, check_param=False, type="service_unavailable_error")
            assert "the engine died" in error["message"]
    s.assert_error(httpx.get(s.base_url + "/health", timeout=5), 503, check_param=False)
    s.assert_error(s.post(C, {"model": s.model_name, "prompt": waiting, "max_tokens": 1}), 503,
                   check_param=False)
    assert s.app.state.engine_failure.startswith("the engine died")

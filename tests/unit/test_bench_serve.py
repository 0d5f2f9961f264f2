"""`bench serve`'s load generator and statistics, against a fake OpenAI-compatible streaming
server on loopback that streams a known number of chunks with known delays."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.assets import BUNDLED_MODEL_DIR
from server.bench import serve as bench
from server.bench.serve import RequestResult, percentiles, summarize

HTTP_ERROR_TOKEN = 1  # a prompt starting with this token id gets HTTP 400
STREAM_ERROR_TOKEN = 2  # ... gets an error event after its first chunk


@dataclass
class FakeState:
    first_delay: float = 0.05  # seconds before the first chunk
    token_delay: float = 0.02  # seconds between chunks
    tokens_per_chunk: int = 1
    hold_until: int = 0  # streams wait until this many requests have been in flight at once
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[dict] = field(default_factory=list)  # body, start, end (server clock)


def _chunk(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        record = {"body": body, "start": time.monotonic(), "end": None}
        state.requests.append(record)
        prompt = body["prompt"]
        first = prompt[0] if isinstance(prompt, list) else None
        if first == HTTP_ERROR_TOKEN:
            record["end"] = time.monotonic()
            return JSONResponse({"error": {"message": "bad prompt", "type": "invalid_request",
                                           "param": "prompt", "code": None}}, status_code=400)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        num_tokens = body["max_tokens"]
        num_chunks = math.ceil(num_tokens / state.tokens_per_chunk)

        async def stream():
            try:
                deadline = time.monotonic() + 30
                while state.max_in_flight < state.hold_until and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(state.first_delay)
                for i in range(num_chunks):
                    if i:
                        await asyncio.sleep(state.token_delay)
                    if i == 1 and first == STREAM_ERROR_TOKEN:
                        yield _chunk({"error": {"message": "engine failed", "code": 500}})
                        return
                    yield _chunk({"id": "x", "object": "text_completion", "choices": [
                        {"index": 0, "text": f" t{i}", "finish_reason":
                         "length" if i == num_chunks - 1 else None}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    num_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                    yield _chunk({"id": "x", "choices": [], "usage": {
                        "prompt_tokens": num_prompt, "completion_tokens": num_tokens,
                        "total_tokens": num_prompt + num_tokens}})
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1
                record["end"] = time.monotonic()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield state, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake(fake_server):
    state, base_url = fake_server
    fresh = FakeState()
    for name in ("first_delay", "token_delay", "tokens_per_chunk", "hold_until", "in_flight",
                 "max_in_flight"):
        setattr(state, name, getattr(fresh, name))
    state.requests.clear()
    return state, base_url


def run_load(base_url: str, prompts: list, output_len: int = 5, concurrency: int | None = None,
             request_rate: float | None = None) -> dict:
    return asyncio.run(bench.run(base_url, "fake", prompts, output_len, concurrency,
                                 request_rate, True, None, 0, progress=False))


# --- pure statistics --------------------------------------------------------------------------

def test_percentiles_on_known_inputs():
    values = [float(v) for v in range(1, 102)]
    random.Random(0).shuffle(values)
    p = percentiles(values)
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == (51.0, 91.0, 100.0, 51.0)
    p = percentiles([0.0, 10.0])
    assert p["p50"] == pytest.approx(5.0) and p["p90"] == pytest.approx(9.0)
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "mean": 7.0}
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_summarize_counts_and_rates():
    results = [
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, e2e=0.5,
                      itls=[0.1] * 4),
        RequestResult(ok=True, prompt_tokens=10, output_tokens=1, ttft=0.2, e2e=0.2),
        RequestResult(ok=False, error="HTTP 500: boom"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_output_tokens"] == 6 and s["total_prompt_tokens"] == 20
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["total_token_throughput"] == pytest.approx(13.0)
    # TPOT only from requests with >= 2 output tokens: (0.5 - 0.1) / 4
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)
    assert s["ttft_s"]["p50"] == pytest.approx(0.15)
    assert s["errors"] == ["HTTP 500: boom"]


# --- against the fake server ------------------------------------------------------------------

def test_latencies_match_the_servers_delays(fake):
    state, base_url = fake
    prompts = bench.make_prompts(6, 12, 500, seed=0)
    s = run_load(base_url, prompts, output_len=5, concurrency=2)
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_output_tokens"] == 30 and s["total_prompt_tokens"] == 72
    # Lower bounds only: the fake server sleeps at least this long; a busy machine adds time.
    assert s["ttft_s"]["p50"] >= 0.045
    assert s["itl_s"]["p50"] >= 0.015
    assert s["tpot_s"]["p50"] >= 0.015
    assert s["e2e_s"]["p50"] >= 0.045 + 4 * 0.018
    assert s["ttft_s"]["p50"] < s["e2e_s"]["p50"]
    # three waves of two requests, each ~0.13 s
    assert s["duration_s"] >= 3 * 0.12
    assert s["output_throughput"] == pytest.approx(30 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"])


def test_send_times_each_chunk(fake):
    import httpx

    state, base_url = fake
    state.first_delay, state.token_delay = 0.06, 0.03

    async def one():
        async with httpx.AsyncClient(timeout=10) as client:
            body = bench.request_body("fake", [5] * 7, 4, True)
            return await bench.send(client, base_url + "/completions", body, {})

    r = asyncio.run(one())
    assert r.ok and (r.prompt_tokens, r.output_tokens) == (7, 4)
    # Lower bounds only (the fake sleeps at least this long), and how the parts add up.
    assert len(r.itls) == 3 and all(x >= 0.015 for x in r.itls)
    assert r.ttft >= 0.055
    assert 0.145 <= r.ttft + sum(r.itls) <= r.e2e
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 3)


def test_output_tokens_come_from_usage_not_chunk_count(fake):
    state, base_url = fake
    state.tokens_per_chunk = 2  # 3 chunks for 6 tokens; usage says 6
    s = run_load(base_url, bench.make_prompts(4, 8, 500, seed=1), output_len=6, concurrency=4)
    assert s["completed"] == 4 and s["total_output_tokens"] == 24
    # two gaps of >= 20 ms per request spread over 5 tokens: TPOT >= 8 ms, ITL >= 20 ms
    assert s["tpot_s"]["p50"] >= 0.007
    assert s["itl_s"]["p50"] >= 0.015


def test_failed_requests_are_counted(fake):
    state, base_url = fake
    prompts = bench.make_prompts(5, 8, 500, seed=2)
    prompts[1][0] = HTTP_ERROR_TOKEN
    prompts[3][0] = STREAM_ERROR_TOKEN
    s = run_load(base_url, prompts, output_len=4)
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["total_output_tokens"] == 12
    assert any(e.startswith("HTTP 400") for e in s["errors"])
    assert "engine failed" in s["errors"]


@pytest.mark.parametrize("concurrency, expected", [(3, 3), (None, 12)])
def test_concurrency_limit_is_respected(fake, concurrency, expected):
    state, base_url = fake
    # Held until `expected` are in flight, so that reaching it does not depend on how fast
    # the machine sends them; more than `expected` would still show.
    state.hold_until = expected
    s = run_load(base_url, bench.make_prompts(12, 8, 500, seed=3), output_len=3,
                 concurrency=concurrency)
    assert s["completed"] == 12
    assert state.max_in_flight == expected


def test_warmup_request_goes_first_and_alone(fake):
    state, base_url = fake
    prompts = bench.make_prompts(4, 8, 500, seed=4)
    run_load(base_url, prompts, output_len=5)
    assert len(state.requests) == 5
    warm, rest = state.requests[0], state.requests[1:]
    assert warm["body"]["max_tokens"] == 4
    assert warm["body"]["prompt"] == prompts[0][::-1]  # no shared prefix with the workload
    assert warm["end"] <= min(r["start"] for r in rest)
    assert sorted(r["body"]["prompt"] for r in rest) == sorted(prompts)
    for r in rest:
        body = r["body"]
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 5


def test_failed_warmup_raises(fake):
    _, base_url = fake
    prompts = bench.make_prompts(2, 8, 500, seed=5)
    prompts[0][-1] = HTTP_ERROR_TOKEN  # reversed: the warm-up prompt starts with it
    with pytest.raises(RuntimeError, match="warm-up"):
        run_load(base_url, prompts)


def test_request_rate_spreads_arrivals(fake):
    state, base_url = fake
    s = run_load(base_url, bench.make_prompts(6, 8, 500, seed=6), output_len=2,
                 request_rate=40.0)
    assert s["completed"] == 6
    starts = [r["start"] for r in state.requests[1:]]
    assert starts[-1] - starts[0] > 0.02  # all at once would be ~0


# --- prompts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from server.engine.tokenizer import load_tokenizer

    return load_tokenizer(BUNDLED_MODEL_DIR)


@pytest.mark.parametrize("input_len", [2, 17, 128, 300])
def test_text_prompts_have_exact_token_lengths(tokenizer, input_len):
    prompts = bench.make_text_prompts(16, input_len, tokenizer, seed=0)
    assert len(prompts) == 16 and all(isinstance(p, str) for p in prompts)
    if input_len > 8:
        assert len(set(prompts)) == 16
    assert [len(tokenizer(p).input_ids) for p in prompts] == [input_len] * 16


def test_text_prompts_are_deterministic_by_seed(tokenizer):
    a = bench.make_text_prompts(4, 32, tokenizer, seed=1)
    assert a == bench.make_text_prompts(4, 32, tokenizer, seed=1)
    assert a != bench.make_text_prompts(4, 32, tokenizer, seed=2)
    assert bench.build_prompts(4, 32, 1, "text", tokenizer=BUNDLED_MODEL_DIR) == a


def test_prompt_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="input-len"):
        bench.make_text_prompts(1, 1, tokenizer, seed=0)  # the BOS token alone
    with pytest.raises(ValueError, match="--tokenizer"):
        bench.build_prompts(1, 8, 0, "text")
    ids = bench.build_prompts(3, 8, 0, "ids", vocab_size=50)
    assert ids == bench.make_prompts(3, 8, 50, 0)
    assert all(len(p) == 8 and all(3 <= t < 50 for t in p) for p in ids)


def test_main_with_text_prompts_writes_json(fake, tmp_path, capsys):
    state, base_url = fake
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "summary.json"
    args = parser.parse_args(["--base-url", base_url, "--model", "fake", "--num-prompts", "3",
                              "--input-len", "20", "--output-len", "3", "--prompt-format",
                              "text", "--tokenizer", str(BUNDLED_MODEL_DIR), "--concurrency",
                              "2", "--ignore-eos", "--json", str(out)])
    assert bench.main(args) == 0
    assert "output tok/s" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["completed"] == 3 and summary["prompt_format"] == "text"
    assert summary["concurrency"] == 2 and summary["input_len"] == 20
    assert all(isinstance(r["body"]["prompt"], str) for r in state.requests)
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    state.requests.clear()
    args = parser.parse_args(["--base-url", base_url, "--model", "fake", "--num-prompts", "2",
                              "--output-len", "3", "--json-schema", str(schema)])
    assert bench.main(args) == 0
    assert len(state.requests) == 3  # the warm-up compiles the grammar too
    for r in state.requests:
        assert r["body"]["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "bench", "schema": {"type": "object"}}}
    with pytest.raises(SystemExit):  # --concurrency and --request-rate exclude each other
        parser.parse_args(["--base-url", "u", "--model", "m", "--concurrency", "2",
                           "--request-rate", "1"])

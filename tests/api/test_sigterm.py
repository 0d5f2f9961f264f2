"""Graceful SIGTERM over the fake engine, in a process of its own (tests/api/fake_serve.py): a
stream in flight when the signal arrives, held there by the fake core, still gets every token,
and so does every one of 64 requests under load; new connections are refused meanwhile, and the
process then exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.http_client import (
    NotHealthy,
    ServerClient,
    assert_exits_cleanly,
    free_port,
    wait_healthy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
C = "/v1/completions"
MAX_TOKENS = 12


class FakeServeProcess(ServerClient):
    name = "fake_serve"
    model_name = "fake-model"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_API_KEY"}
        cmd = [sys.executable, "-m", "tests.api.fake_serve", "--port", str(self.port),
               "--served-model-name", self.model_name, "--log-level", "info",
               "--debug-endpoints"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                         stdout=log, stderr=subprocess.STDOUT)

    def resume_core(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{self.log()}"
            time.sleep(0.02)


@pytest.fixture()
def fake_process(tmp_path):
    s = FakeServeProcess(tmp_path / "fake_serve.log")
    try:
        try:
            wait_healthy(s.base_url, 60, s.proc)
        except NotHealthy as e:
            pytest.fail(f"{e}\n{s.log()}")
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.wait(10)
        s.proc.stdin.close()


def _refused(s: ServerClient, method: str, path: str, **kwargs) -> bool:
    """Whether a request on a new connection is turned away: connection refused, or 503."""
    try:
        r = httpx.request(method, s.base_url + path, timeout=10, **kwargs)
    except httpx.ConnectError:
        return True
    if r.status_code == 503:
        s.assert_error(r, 503, check_param=False)
        return True
    return False


def test_sigterm_finishes_in_flight_stream_then_exits_0(fake_process):
    s = fake_process
    # Without BOS, the one step the core runs makes a token with text: the first chunk.
    prompt = s.post("/tokenize", {"model": s.model_name, "prompt": "Once upon a time",
                                  "add_special_tokens": False}).json()["tokens"]
    body = {"model": s.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with s.client() as c, c.stream("POST", C, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The core ran its one step and holds the rest: the stream is in flight.
        s.proc.send_signal(signal.SIGTERM)
        # uvicorn logs this once it has stopped listening and waits for our stream to end.
        s.wait_log("Waiting for connections to close", timeout=30)
        assert _refused(s, "GET", "/health")
        assert _refused(s, "POST", C, json={**body, "stream": False, "max_tokens": 1})
        assert s.proc.poll() is None, s.log()
        s.resume_core()
        rest = [line for line in lines if line]
    chunks = s.parse_sse("\n\n".join([first, *rest]) + "\n\n")
    assert {ch["id"] for ch in chunks} == {json.loads(first[len("data: "):])["id"]}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    finish = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finish[-1] == "length" and not any(finish[:-1])
    assert_exits_cleanly(s.proc, s.log)


def _full_answer(s: ServerClient, body: dict) -> str:
    """One request to its end: what it came to, "whole" when every token arrived."""
    try:
        if body["stream"]:
            with s.client(timeout=120) as c, c.stream("POST", C, json=body) as r:
                raw = r.read().decode()
            if r.status_code != 200 or not raw.rstrip().endswith("data: [DONE]"):
                return f"{r.status_code}: {raw[-200:]}"
            tokens = s.parse_sse(raw)[-1]["usage"]["completion_tokens"]
        else:
            r = s.post(C, body, timeout=120)
            if r.status_code != 200:
                return f"{r.status_code}: {r.text[:200]}"
            tokens = r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return "whole" if tokens == MAX_TOKENS else f"{tokens} tokens"


def test_sigterm_under_load_loses_no_request(fake_process):
    s = fake_process
    num = 64
    bodies = [{"model": s.model_name, "prompt": f"Once upon a time {i}", "max_tokens": MAX_TOKENS,
               "ignore_eos": True, "stream": i % 2 == 0,
               **({"stream_options": {"include_usage": True}} if i % 2 == 0 else {})}
              for i in range(num)]
    answers: list[str] = []
    threads = [threading.Thread(target=lambda b=b: answers.append(_full_answer(s, b)))
               for b in bodies]
    for t in threads:
        t.start()
    # Every request is in the engine (one step ran; the fake core holds the rest). The check
    # runs after every add that came before it.
    deadline = time.monotonic() + 60
    while (check := s.engine_check())["num_running"] + check["num_waiting"] < num:
        assert time.monotonic() < deadline, check
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    s.wait_log("Waiting for connections to close", timeout=30)
    assert _refused(s, "POST", C, json={**bodies[1], "max_tokens": 1})
    s.resume_core()
    for t in threads:
        t.join(120)
    assert answers == ["whole"] * num
    assert_exits_cleanly(s.proc, s.log)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_drain_at_once(fake_process, second):
    s = fake_process
    body = {"model": s.model_name, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True}
    with s.client() as c, c.stream("POST", C, json=body) as r:
        assert r.status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        s.wait_log("Waiting for connections to close", timeout=30)
        assert s.proc.poll() is None  # draining: the fake holds the stream
        s.proc.send_signal(second)
        assert s.proc.wait(timeout=30) == 128 + second

def test_a_model_that_cannot_load_exits_1_with_one_message(tmp_path):
    """`serve FILE.gguf`: the engine cannot start, so the process says why and exits non-zero
    (a supervisor sees it) instead of answering 503 forever."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cmd = [sys.executable, "-m", "server", "serve", str(gguf), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pagedserve: the engine failed to start:") and "GGUF" in last, last
    assert "Traceback" not in proc.stderr

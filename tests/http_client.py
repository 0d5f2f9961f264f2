"""HTTP helpers shared by the tests that talk to a served app: the real server in a subprocess
(tests/e2e) and the app over the fake engine (tests/api). `ServerClient` needs `base_url` and
`api_key`; everything else it offers is built on those."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from typing import Any

import httpx

ERROR_KEYS = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotHealthy(RuntimeError):
    pass


def wait_healthy(base_url: str, timeout: float = 60.0,
                 proc: subprocess.Popen | None = None) -> list[int]:
    """Poll GET /health until it answers 200; return every status it answered (the last one
    the 200). Raises NotHealthy after `timeout` s, as soon as `proc` (the server's process) has
    exited, or as soon as /health reports that the engine failed to start."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotHealthy(f"the server exited with {proc.returncode} before /health said 200")
        try:
            r = httpx.get(f"{base_url}/health", timeout=2)
        except httpx.HTTPError:
            pass  # not listening yet
        else:
            statuses.append(r.status_code)
            if r.status_code == 200:
                return statuses
            if "failed to start" in r.text:
                raise NotHealthy(f"/health answered {r.status_code}: {r.text}")
        time.sleep(0.05)
    raise NotHealthy(f"{base_url}/health did not say 200 within {timeout} s "
                     f"(it answered {sorted(set(statuses))})")


def assert_exits_cleanly(proc: subprocess.Popen, log, timeout: float = 30.0) -> None:
    """`proc` (a server sent SIGTERM) exits 0 within `timeout`, with no traceback in `log()`."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within {timeout} s of SIGTERM:\n"
                             f"{log()[-3000:]}") from None
    assert rc == 0, log()[-3000:]
    assert "Traceback" not in log(), log()[-3000:]


def parse_prometheus(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, brace, labels = key.partition("{")
        if brace:  # labels in sorted order, so tests need not know the exporter's order
            pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)
            key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(pairs)) + "}"
        samples[key] = float(value)
        samples.setdefault(name, float(value))
    return samples


def parse_sse(raw: str) -> list[dict]:
    """Check OpenAI's SSE framing (`data: {json}\\n\\n` events, ending with `data: [DONE]`) and
    return the JSON payloads before [DONE]."""
    assert raw.endswith("data: [DONE]\n\n"), f"stream does not end with [DONE]: {raw[-300:]!r}"
    events = raw[:-len("\n\n")].split("\n\n")
    assert events[-1] == "data: [DONE]"
    chunks = []
    for event in events[:-1]:
        assert event.startswith("data: "), f"bad SSE event {event!r}"
        assert "\n" not in event, f"multi-line SSE event {event!r}"
        payload = event[len("data: "):]
        assert payload != "[DONE]", "[DONE] before the end of the stream"
        chunks.append(json.loads(payload))
    return chunks


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 check_param: bool = True) -> dict:
    """The response is `status` with exactly OpenAI's envelope; returns the inner error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), \
        response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert "detail" not in body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if check_param:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if type is not None:
        assert error["type"] == type, error
    return error


class ServerClient:
    """Clients and requests for one served app; subclasses set `port`, `name`, `model_name`
    and `api_key`."""

    name: str = "server"
    port: int = 0
    model_name: str = ""
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # ------------------------------------------------------------------ clients
    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60.0)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 60.0)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, **kwargs)

    def openai(self, **kwargs: Any):
        from openai import OpenAI

        kwargs.setdefault("api_key", self.api_key or "x")
        kwargs.setdefault("timeout", 60.0)
        return OpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)

    def async_openai(self, **kwargs: Any):
        from openai import AsyncOpenAI

        kwargs.setdefault("api_key", self.api_key or "x")
        kwargs.setdefault("timeout", 60.0)
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)

    # ------------------------------------------------------------------ requests
    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        with self.client() as c:
            if body is not None:
                kwargs["json"] = body
            return c.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kwargs)

    def complete(self, **body: Any) -> dict:
        """POST /v1/completions; asserts 200 and returns the JSON."""
        body.setdefault("model", self.model_name)
        r = self.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    def chat(self, **body: Any) -> dict:
        body.setdefault("model", self.model_name)
        r = self.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        return r.json()

    def stream(self, path: str, body: dict) -> tuple[list[dict], str]:
        """POST a streaming request; return the JSON chunks and the raw body (checked framing)."""
        body = {"model": self.model_name, **body, "stream": True}
        with self.client() as c, c.stream("POST", path, json=body) as r:
            assert r.status_code == 200, r.read().decode()
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
        return self.parse_sse(raw), raw

    def tokenize(self, prompt: str | None = None, messages: list | None = None) -> dict:
        body: dict[str, Any] = {"model": self.model_name}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        r = self.post("/tokenize", body)
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by 'name{labels}' with the labels sorted by name (and by bare
        name for the first sample of each name)."""
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return parse_prometheus(r.text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and no KV block is in use."""
        deadline = time.monotonic() + timeout
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            samples = self.metrics()
            if (samples.get("pagedserve:num_requests_running") == 0
                    and samples.get("pagedserve:num_requests_waiting") == 0
                    and samples.get("pagedserve:kv_cache_usage_perc") == 0):
                return samples
            time.sleep(0.05)
        running = {k: v for k, v in samples.items()
                   if k.split("{")[0] in ("pagedserve:num_requests_running",
                                          "pagedserve:num_requests_waiting",
                                          "pagedserve:kv_cache_usage_perc")}
        raise AssertionError(f"server {self.name} still busy after {timeout} s: {running}")

    def engine_check(self) -> dict:
        """GET /debug/engine (a server with debug endpoints): the pool's invariant check."""
        r = self.get("/debug/engine")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_settled(self, timeout: float = 30.0) -> dict:
        """Poll the engine check until nothing runs or waits; asserts the invariants hold and
        every KV block is back in the free list, and returns the last check."""
        deadline = time.monotonic() + timeout
        check = self.engine_check()
        while check["num_running"] or check["num_waiting"]:
            assert time.monotonic() < deadline, f"server {self.name} still busy: {check}"
            time.sleep(0.05)
            check = self.engine_check()
        assert check["problem"] is None, check
        assert check["num_free_blocks"] == check["num_blocks"], f"blocks leaked: {check}"
        return check

    def wait_metric(self, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metrics().get(name)
            if value is not None and predicate(value):
                return value
            time.sleep(0.02)
        raise AssertionError(f"{name} = {value} did not reach the expected value in {timeout} s")

    # ------------------------------------------------------------------ checks
    parse_sse = staticmethod(parse_sse)
    assert_error = staticmethod(assert_error)
    parse_prometheus = staticmethod(parse_prometheus)

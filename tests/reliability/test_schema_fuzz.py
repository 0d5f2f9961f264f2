"""Fuzzing from the OpenAPI document: schemathesis generates valid and invalid requests for every
route (bodies, path parameters, content types) against the real engine over the bundled model.
Every answer is a 2xx or a 4xx in OpenAI's error envelope, never a 5xx; a stream ends with
[DONE] (a Responses stream with its final state) and carries no server error; afterwards the
pool's invariants hold, no block is leaked, and a normal request is served.

PAGEDSERVE_FUZZ_CASES sets the cases per route and mode (CI: the default; the README's figure
comes from a larger run, see docs/reliability.md)."""

from __future__ import annotations

import collections
import json
import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from server.api.app import build_app
from server.config import EngineConfig, ServerConfig
from server.engine.fake import FakeEngineClient, FakeEngineCore
from tests.http_client import ERROR_KEYS

CASES = int(os.environ.get("PAGEDSERVE_FUZZ_CASES", "25"))
SERVED: collections.Counter[str] = collections.Counter()  # "METHOD path" -> cases
STATUSES: collections.Counter[int] = collections.Counter()


def _document() -> dict:
    """The served app's OpenAPI document (the engine is not started to build it)."""
    config = ServerConfig(debug_endpoints=True)
    return build_app(EngineConfig.from_kwargs(), config,
                     engine=FakeEngineClient(FakeEngineCore())).openapi()


schema = schemathesis.openapi.from_dict(_document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=CASES)
schema.config.max_stream_events = 1 << 20  # read whole streams (the default stops at 20 events)


def _check_answer(response) -> None:
    status = response.status_code
    assert status < 500, (status, response.text[:500])
    content_type = (response.headers.get("content-type") or [""])[0]  # header -> its values
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type)
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif content_type.startswith("text/event-stream") and response.request.url.endswith(
            "/v1/responses"):  # typed events, ending with the response's final state
        events = [json.loads(e.split("data: ", 1)[1])
                  for e in response.text.split("\n\n") if e.strip()]
        assert events and events[-1]["type"] in ("response.completed", "response.incomplete"), \
            response.text[-300:]
        assert all(e["type"] != "error" for e in events), response.text[-300:]
    elif content_type.startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e.strip()]
        assert events and events[-1] == "data: [DONE]", response.text[-300:]
        for event in events[:-1]:
            chunk = json.loads(event.removeprefix("data: "))
            assert "error" not in chunk, chunk


@schema.parametrize()
@settings(max_examples=CASES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_answer_is_2xx_or_an_enveloped_4xx(case, engine_server):
    response = case.call(base_url=engine_server.base_url, headers=engine_server.headers,
                         timeout=120)
    SERVED[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    _check_answer(response)


def test_the_server_is_whole_after_the_fuzzing(engine_server):
    assert sum(SERVED.values()) >= CASES, SERVED  # the fuzz tests ran first, in this process
    print(f"\nfuzzed {sum(SERVED.values())} cases; answers by status: {dict(STATUSES)}; "
          f"by route: {dict(SERVED)}")
    engine_server.wait_settled()
    out = engine_server.complete(prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] == 8

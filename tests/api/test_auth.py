"""`--api-key` over the fake engine: every route but /health wants the key (and /metrics only
with --public-metrics off), and the key never reaches a log line."""

from __future__ import annotations

import logging

import httpx
import pytest

KEY = "sk-fake-auth-key-0123456789"
OPEN = ["/health"]
GUARDED = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "Hi"}),
           ("GET", "/metrics", None), ("GET", "/version", None), ("GET", "/openapi.json", None),
           ("GET", "/docs", None), ("POST", "/tokenize", {"prompt": "Hi"}),
           ("GET", "/no-such-route", None)]


def _request(server, method, path, body, headers):
    return httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("method,path,body", GUARDED, ids=[p for _, p, _ in GUARDED])
def test_every_route_but_health_wants_the_key(make_fake_server, method, path, body, caplog):
    caplog.set_level(logging.DEBUG)
    s = make_fake_server(api_key=KEY)
    for path_open in OPEN:
        assert httpx.get(s.base_url + path_open, timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        s.assert_error(_request(s, method, path, body, headers), 401, param=None,
                       code="invalid_api_key")
    good = _request(s, method, path, body, {"Authorization": f"Bearer {KEY}"})
    assert good.status_code != 401, good.text
    assert KEY not in caplog.text


def test_public_metrics_opens_only_metrics(make_fake_server):
    s = make_fake_server(api_key=KEY, public_metrics=True)
    assert httpx.get(s.base_url + "/metrics", timeout=10).status_code == 200
    s.assert_error(httpx.get(s.base_url + "/v1/models", timeout=10), 401, param=None,
                   code="invalid_api_key")


def test_without_a_key_everything_is_open(fake_server):
    assert httpx.get(fake_server.base_url + "/metrics", timeout=10).status_code == 200
    assert httpx.get(fake_server.base_url + "/v1/models", timeout=10).status_code == 200

"""Every endpoint answers, in the shape OpenAI clients and Prometheus scrapers expect."""

from __future__ import annotations

import re

import openai
import pytest

PROMPT = "Once upon a time"

METRIC_NAMES = (
    "pagedserve:num_requests_running",
    "pagedserve:num_requests_waiting",
    "pagedserve:kv_cache_usage_perc",
    "pagedserve:prefix_cache_queries_total",
    "pagedserve:prefix_cache_hits_total",
    "pagedserve:num_preemptions_total",
    "pagedserve:prompt_tokens_total",
    "pagedserve:generation_tokens_total",
    "pagedserve:time_to_first_token_seconds_bucket",
    "pagedserve:inter_token_latency_seconds_bucket",
    "pagedserve:e2e_request_latency_seconds_bucket",
    "pagedserve:request_queue_time_seconds_bucket",
)


def test_health(server):
    r = server.get("/health")
    assert r.status_code == 200


def test_version(server):
    r = server.get("/version")
    assert r.status_code == 200
    version = r.json()["version"]
    assert isinstance(version, str) and re.match(r"^\d+\.\d+", version)


def test_models_list_and_retrieve_raw(server):
    r = server.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [server.model_name]
    card = body["data"][0]
    assert card["object"] == "model"
    assert isinstance(card["created"], int)
    assert isinstance(card["owned_by"], str)
    assert card["max_model_len"] == 512

    one = server.get(f"/v1/models/{server.model_name}")
    assert one.status_code == 200
    assert one.json() == card


def test_models_with_sdk(server, oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [server.model_name]
    model = oai.models.retrieve(server.model_name)
    assert model.id == server.model_name and model.object == "model"


def test_unknown_model_id_is_404_model_not_found(server, oai):
    r = server.get("/v1/models/no-such-model")
    server.assert_error(r, 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_metrics_is_prometheus_text(server):
    server.complete(prompt=PROMPT, max_tokens=3, temperature=0)
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in METRIC_NAMES:
        assert re.search(rf"^{re.escape(name)}(\{{[^}}]*\}})? ", text, re.M), name
    assert re.search(r'^# TYPE pagedserve:num_requests_running gauge$', text, re.M)
    assert re.search(r'^# TYPE pagedserve:time_to_first_token_seconds histogram$', text, re.M)
    assert f'model_name="{server.model_name}"' in text


def test_metrics_count_tokens_and_finished_requests(server):
    server.wait_idle()
    before = server.metrics()
    out = server.complete(prompt=PROMPT, max_tokens=7, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 7
    after = server.wait_idle()
    key = f'{{model_name="{server.model_name}"}}'
    gen = "pagedserve:generation_tokens_total" + key
    prompt = "pagedserve:prompt_tokens_total" + key
    assert after[gen] - before.get(gen, 0) == 7
    assert after[prompt] - before.get(prompt, 0) == out["usage"]["prompt_tokens"]
    length = ('pagedserve:request_success_total{finished_reason="length",'
              f'model_name="{server.model_name}"}}')
    assert after[length] - before.get(length, 0) == 1
    e2e = "pagedserve:e2e_request_latency_seconds_count" + key
    ttft = "pagedserve:time_to_first_token_seconds_count" + key
    assert after[e2e] - before.get(e2e, 0) == 1
    assert after[ttft] - before.get(ttft, 0) == 1


def test_tokenize_prompt_and_detokenize(server):
    r = server.post("/tokenize", {"model": server.model_name, "prompt": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 1
    assert body["max_model_len"] == 512
    assert all(isinstance(t, int) and 0 <= t < 512 for t in body["tokens"])

    d = server.post("/detokenize", {"model": server.model_name, "tokens": body["tokens"]})
    assert d.status_code == 200
    assert d.json()["prompt"].endswith(PROMPT)

    # Without special tokens the round trip is exact.
    r2 = server.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert r2.status_code == 200
    assert r2.json()["count"] == body["count"] - 1
    d2 = server.post("/detokenize", {"tokens": r2.json()["tokens"]})
    assert d2.json()["prompt"] == PROMPT


def test_tokenize_messages_uses_the_chat_template(server):
    messages = [{"role": "system", "content": "Tell a story."},
                {"role": "user", "content": "About a cat."}]
    r = server.post("/tokenize", {"model": server.model_name, "messages": messages})
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    text = server.post("/detokenize", {"tokens": tokens}).json()["prompt"]
    assert text == "system: Tell a story.\nuser: About a cat.\nassistant:"
    no_gen = server.post("/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert no_gen.status_code == 200
    assert no_gen.json()["count"] < r.json()["count"]


def test_tokenize_needs_exactly_one_of_prompt_or_messages(server):
    server.assert_error(server.post("/tokenize", {"model": server.model_name}), 400,
                        check_param=False)
    both = {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
    server.assert_error(server.post("/tokenize", both), 400, check_param=False)


def test_detokenize_out_of_range_token_is_400(server):
    r = server.post("/detokenize", {"tokens": [1, 512]})
    server.assert_error(r, 400, param="tokens")


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_unknown_model_is_404(server, path):
    body = {"model": "nope", "prompt": "a"} if path == "/tokenize" else {"model": "nope",
                                                                          "tokens": [5]}
    server.assert_error(server.post(path, body), 404, param="model", code="model_not_found")


def test_request_id_is_echoed_or_generated(server):
    with server.client() as c:
        given = c.get("/v1/models", headers={"X-Request-Id": "e2e-req-123"})
        assert given.headers["x-request-id"] == "e2e-req-123"
        generated = c.get("/v1/models")
        other = c.get("/v1/models")
        assert generated.headers.get("x-request-id")
        assert generated.headers["x-request-id"] != other.headers["x-request-id"]
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                   headers={"X-Request-Id": "e2e-completion"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-completion"
        err = c.post("/v1/completions", json={"prompt": PROMPT, "n": 0},
                     headers={"X-Request-Id": "e2e-error"})
        assert err.status_code == 400 and err.headers["x-request-id"] == "e2e-error"
        with c.stream("POST", "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 2, "stream": True},
                      headers={"X-Request-Id": "e2e-stream"}) as s:
            assert s.headers["x-request-id"] == "e2e-stream"
            s.read()


def test_unknown_route_is_404_in_the_envelope(server):
    for method, path in (("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/completions/x")):
        with server.client() as c:
            r = c.request(method, path)
        server.assert_error(r, 404, param=None)


def test_wrong_method_is_405_in_the_envelope(server):
    with server.client() as c:
        for method, path in (("GET", "/v1/completions"), ("GET", "/v1/chat/completions"),
                             ("DELETE", "/v1/models"), ("POST", "/health"),
                             ("PUT", "/tokenize")):
            r = c.request(method, path)
            server.assert_error(r, 405, param=None)

"""Every client mistake is a 4xx in OpenAI's envelope `{"error": {message, type, param, code}}`
(never a 500 or FastAPI's `{"detail": ...}`), with `param` naming the field."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

PROMPT = "Once upon a time"
MSGS = [{"role": "user", "content": "Hi"}]
MAX_MODEL_LEN = 512
API_KEY_RAW = "sk-e2e-flag-key"  # conftest.API_KEY, the auth_server's --api-key

C = "/v1/completions"
CHAT = "/v1/chat/completions"


def comp(**fields):
    return {"prompt": PROMPT, "max_tokens": 2, **fields}


def chat(**fields):
    return {"messages": MSGS, "max_tokens": 2, **fields}


# (path, JSON body, expected param)
VALIDATION = [
    # out-of-range numbers
    (C, comp(temperature=2.5), "temperature"),
    (C, comp(temperature=-0.1), "temperature"),
    (CHAT, chat(temperature=3), "temperature"),
    (C, comp(top_p=1.5), "top_p"),
    (C, comp(top_p=-0.5), "top_p"),
    (C, comp(presence_penalty=2.5), "presence_penalty"),
    (CHAT, chat(presence_penalty=-2.1), "presence_penalty"),
    (C, comp(frequency_penalty=-3), "frequency_penalty"),
    (C, comp(max_tokens=0), "max_tokens"),
    (C, comp(max_tokens=-5), "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), "max_completion_tokens"),
    (C, comp(n=0), "n"),
    (C, comp(n=129), "n"),
    (CHAT, chat(n=0), "n"),
    (CHAT, chat(n=129), "n"),
    (C, comp(logprobs=21), "logprobs"),
    (C, comp(logprobs=-1), "logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (CHAT, chat(top_logprobs=2), "top_logprobs"),  # needs logprobs: true
    # wrong types
    (C, comp(max_tokens="5"), "max_tokens"),
    (C, comp(temperature="hot"), "temperature"),
    (CHAT, chat(temperature="hot"), "temperature"),
    (C, comp(n="2"), "n"),
    (C, comp(n=1.5), "n"),
    (C, comp(stream="yes"), "stream"),
    (C, comp(seed="x"), "seed"),
    (C, comp(echo="true"), "echo"),
    (C, comp(prompt=123), "prompt"),
    (C, comp(prompt={"text": "hi"}), "prompt"),
    (C, comp(stop=7), "stop"),
    (C, comp(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    (CHAT, chat(messages="hi"), "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (CHAT, chat(messages=[{"content": "hi"}]), "messages"),
    (CHAT, chat(logprobs=5), "logprobs"),
    # logit_bias
    (C, comp(logit_bias={"abc": 1}), "logit_bias"),
    (C, comp(logit_bias={"-3": 1}), "logit_bias"),
    (C, comp(logit_bias={"5": 150}), "logit_bias"),
    (C, comp(logit_bias={"5": -100.5}), "logit_bias"),
    (CHAT, chat(logit_bias={"abc": 1}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": 150}), "logit_bias"),
    (C, comp(logit_bias={"5": "big"}), "logit_bias"),
    (C, comp(logit_bias={"512": 5}), "logit_bias"),  # not a token of this vocabulary
    (C, comp(stop_token_ids=[9999]), "stop_token_ids"),
    (CHAT, chat(stop_token_ids=[3, 512]), "stop_token_ids"),
    # stop
    (C, comp(stop=""), "stop"),
    (C, comp(stop=["ok", ""]), "stop"),
    (C, comp(stop=["a", "b", "c", "d", "e"]), "stop"),
    (CHAT, chat(stop=""), "stop"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    # missing / empty inputs
    (C, {"max_tokens": 2}, "prompt"),
    (C, comp(prompt=[]), "prompt"),
    (C, comp(prompt=[[]]), "prompt"),
    (C, comp(prompt=[5, 600]), "prompt"),  # token id outside the vocabulary
    (C, comp(prompt=[[5], [-1]]), "prompt"),
    (CHAT, {"max_tokens": 2}, "messages"),
    (CHAT, chat(messages=[]), "messages"),
    # extensions
    (C, comp(top_k=-2), "top_k"),
    (C, comp(min_p=1.5), "min_p"),
    (C, comp(repetition_penalty=0), "repetition_penalty"),
    (C, comp(repetition_penalty=2.5), "repetition_penalty"),
    (C, comp(min_tokens=-1), "min_tokens"),
    (C, comp(stop_token_ids=["a"]), "stop_token_ids"),
    (C, comp(ignore_eos="no"), "ignore_eos"),
]


def _id(i: int, case) -> str:
    path, _, param = case
    return f"{i:02d}-{'chat' if path == CHAT else 'cmpl'}-{param}"


@pytest.mark.parametrize("case", VALIDATION, ids=[_id(i, c) for i, c in enumerate(VALIDATION)])
def test_validation_errors(server, case):
    path, body, param = case
    r = server.post(path, body)
    server.assert_error(r, 400, param=param, type="invalid_request_error")


# (path, raw body bytes)
MALFORMED = [
    (C, b'{"prompt": "hi", '),
    (C, b"{prompt: hi}"),
    (C, b"[1, 2]"),
    (C, b"null"),
    (C, b'"a string"'),
    (C, b"42"),
    (C, b""),
    (C, b'{"prompt": "\xff\xfe hi"}'),
    (C, b"\xff\xfe{}"),
    (CHAT, b"{not json"),
    (CHAT, b"[1, 2]"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'),
]


@pytest.mark.parametrize("path,raw", MALFORMED, ids=[repr(r)[:40] for _, r in MALFORMED])
def test_malformed_bodies(server, path, raw):
    r = server.post(path, content=raw, headers={"Content-Type": "application/json"})
    server.assert_error(r, 400, param=None, type="invalid_request_error")


@pytest.mark.parametrize("path", [C, CHAT, "/tokenize"])
def test_unknown_model_is_404(server, path):
    body = {"model": "gpt-4o", "prompt": PROMPT} if path != CHAT else {"model": "gpt-4o",
                                                                       "messages": MSGS}
    r = server.post(path, body)
    error = server.assert_error(r, 404, param="model", code="model_not_found")
    assert "gpt-4o" in error["message"]


def test_errors_through_the_sdk(server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=server.model_name, prompt=PROMPT, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=server.model_name, messages=MSGS,
                                    stop=["a", "b", "c", "d", "e"])
    assert e.value.param == "stop"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=server.model_name, prompt=PROMPT, stream=True, n=0)
    assert e.value.param == "n"


# ---------------------------------------------------------------------- context length
def _numbers(message: str) -> set[int]:
    return {int(x) for x in re.findall(r"\d+", message)}


def test_completion_prompt_longer_than_the_context(server):
    prompt = [5] * 600
    r = server.post(C, {"prompt": prompt})
    error = server.assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert {512, 600} <= _numbers(error["message"])
    # exactly the context: no room for a single token
    r = server.post(C, {"prompt": [5] * MAX_MODEL_LEN, "max_tokens": 1})
    server.assert_error(r, 400, code="context_length_exceeded", check_param=False)
    # a text prompt too
    text = " ".join(["Lily ran to the park."] * 80)
    n = server.post("/tokenize", {"prompt": text}).json()["count"]
    assert n > MAX_MODEL_LEN
    error = server.assert_error(server.post(C, {"prompt": text}), 400, param="prompt",
                                code="context_length_exceeded")
    assert {512, n} <= _numbers(error["message"])


def test_completion_prompt_plus_max_tokens_longer_than_the_context(server):
    r = server.post(C, {"prompt": [5] * 500, "max_tokens": 20})
    error = server.assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
    assert {512, 500, 20} <= _numbers(error["message"])
    # one prompt of several too long
    r = server.post(C, {"prompt": [[5] * 10, [5] * 505], "max_tokens": 10})
    server.assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
    # just fits
    ok = server.post(C, {"prompt": [5] * 500, "max_tokens": 12, "temperature": 0})
    assert ok.status_code == 200, ok.text
    # without an explicit max_tokens a long prompt is fine: output stops at the context end
    ok = server.post(C, {"prompt": [5] * 505, "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 505


def test_chat_longer_than_the_context(server, oai):
    messages = [{"role": "user", "content": " ".join(["Lily ran to the park."] * 80)}]
    n = server.tokenize(messages=messages)["count"]
    assert n > MAX_MODEL_LEN
    for extra in ({}, {"max_tokens": 5}):
        r = server.post(CHAT, {"messages": messages, **extra})
        error = server.assert_error(r, 400, param="messages", code="context_length_exceeded")
        assert {512, n} <= _numbers(error["message"])
    short = [{"role": "user", "content": "Hi"}]
    m = server.tokenize(messages=short)["count"]
    r = server.post(CHAT, {"messages": short, "max_tokens": 600})
    error = server.assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
    assert {512, 600, m + 600} <= _numbers(error["message"])
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=server.model_name, messages=messages)
    assert e.value.code == "context_length_exceeded"


# ---------------------------------------------------------------------- chat template
def test_chat_without_a_chat_template_is_400(auth_server):
    r = auth_server.post(CHAT, {"model": "stories260k", "messages": MSGS})
    error = auth_server.assert_error(r, 400, param="messages")
    assert "template" in error["message"]
    r = auth_server.post("/tokenize", {"messages": MSGS})
    auth_server.assert_error(r, 400, param="messages")
    client = auth_server.openai()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="stories260k", messages=MSGS, stream=True)
    # completions still work on it
    out = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=3)
    assert out.usage.completion_tokens <= 3


# ---------------------------------------------------------------------- API key
PROTECTED = [("POST", C, {"prompt": PROMPT, "max_tokens": 1}),
             ("POST", CHAT, {"messages": MSGS}),
             ("GET", "/v1/models", None),
             ("GET", "/v1/models/stories260k", None),
             ("POST", "/tokenize", {"prompt": PROMPT}),
             ("POST", "/detokenize", {"tokens": [1]})]


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_api_key_missing_or_wrong_is_401(auth_server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY_RAW},
                    {"Authorization": "Basic " + API_KEY_RAW}):
        headers["X-Request-Id"] = "e2e-unauthorized"
        r = httpx.request(method, auth_server.base_url + path, json=body, headers=headers,
                          timeout=30)
        auth_server.assert_error(r, 401, param=None, code="invalid_api_key")
        assert r.headers["x-request-id"] == "e2e-unauthorized"


def test_api_key_correct_works(auth_server):
    with auth_server.client() as c:  # sends the right bearer token
        assert c.get("/v1/models").json()["data"][0]["id"] == "stories260k"
        r = c.post(C, json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.post("/tokenize", json={"prompt": PROMPT}).status_code == 200
    sdk = auth_server.openai()
    assert sdk.completions.create(model="stories260k", prompt=PROMPT,
                                  max_tokens=2).usage.completion_tokens <= 2


def test_api_key_with_the_sdk(auth_server):
    for key in ("wrong", ""):
        client = auth_server.openai(api_key=key or "x")
        with pytest.raises(openai.AuthenticationError) as e:
            client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            list(client.chat.completions.create(model="stories260k", messages=MSGS,
                                                stream=True))


def test_health_is_never_behind_the_api_key(auth_server):
    r = httpx.get(auth_server.base_url + "/health", timeout=10)
    assert r.status_code == 200
    r = httpx.get(auth_server.base_url + "/health", headers={"Authorization": "Bearer bad"},
                  timeout=10)
    assert r.status_code == 200


def test_api_key_from_the_environment(limits_server):
    url = limits_server.base_url
    ok = httpx.get(url + "/v1/models", headers=limits_server.headers, timeout=10)
    assert ok.status_code == 200
    assert [m["id"] for m in ok.json()["data"]] == [limits_server.model_name]
    for headers in ({}, {"Authorization": "Bearer " + API_KEY_RAW}):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        limits_server.assert_error(r, 401, param=None, code="invalid_api_key")
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_served_model_name(limits_server):
    out = limits_server.complete(prompt=PROMPT, max_tokens=2)
    assert out["model"] == limits_server.model_name == "limited-storyteller"
    r = limits_server.post(C, {"model": "tiny-stories-chat", "prompt": PROMPT})
    limits_server.assert_error(r, 404, param="model", code="model_not_found")
    r = limits_server.get("/v1/models/tiny-stories-chat")
    limits_server.assert_error(r, 404, param="model", code="model_not_found")


# ---------------------------------------------------------------------- 413
def test_body_over_the_limit_is_413(limits_server):
    big = {"prompt": "a " * 3000, "max_tokens": 1}
    r = limits_server.post(C, big)
    limits_server.assert_error(r, 413, param=None)
    r = limits_server.post(CHAT, {"messages": [{"role": "user", "content": "b " * 3000}]})
    limits_server.assert_error(r, 413, param=None)


def test_chunked_body_over_the_limit_is_413(limits_server):
    """No Content-Length: the limit is enforced while reading."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 512
        yield b'", "max_tokens": 1}'

    with limits_server.client() as c:
        r = c.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    limits_server.assert_error(r, 413, param=None)


def test_body_under_the_limit_is_fine(limits_server):
    body = {"prompt": PROMPT, "max_tokens": 1, "user": "u" * 3500}
    r = limits_server.post(C, body)
    assert r.status_code == 200, r.text

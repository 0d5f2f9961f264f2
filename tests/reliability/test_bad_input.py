"""A hand-written corpus of bad input at every field, against the real engine over the bundled
model: each case gets a 4xx in OpenAI's error envelope whose `param` names the field (None
where no field is to blame: a body that is not JSON at all), and the server goes on serving."""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import MAX_MODEL_LEN, MODEL_NAME

VOCAB = 512  # the bundled model's
C, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
MSGS = [{"role": "user", "content": "Hi"}]


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL_NAME, "messages": MSGS, "max_tokens": 4, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# (id, path, body: a dict sent as JSON or raw bytes, status, param)
CASES = [
    # ------------------------------------------------------------- not JSON, not an object
    ("truncated-json", C, b'{"model": "stories", "prompt": "x",', 400, None),
    ("not-json", C, b"prompt=hello", 400, None),
    ("empty-body", C, b"", 400, None),
    ("array-body", C, b"[1, 2, 3]", 400, None),
    ("string-body", CHAT, b'"hello"', 400, None),
    ("non-utf8-bytes", C, b'{"model": "stories", "prompt": "\xff\xfe\xfd"}', 400, None),
    ("nan-literal", C, b'{"model": "stories", "prompt": "x", "temperature": NaN}', 400,
     "temperature"),
    ("deep-nesting-prompt", C,
     f'{{"model": "stories", "prompt": {nested(100_000)}}}'.encode(), 400, None),
    ("deep-nesting-field", CHAT,  # past the parser's depth limit: not JSON it reads
     f'{{"model": "stories", "messages": [], "user": {nested(5_000)}}}'.encode(), 400, None),
    # ------------------------------------------------------------- missing and null
    ("missing-prompt", C, {"model": MODEL_NAME}, 400, "prompt"),
    ("missing-messages", CHAT, {"model": MODEL_NAME}, 400, "messages"),
    ("null-prompt", C, completion(prompt=None), 400, "prompt"),
    ("null-messages", CHAT, chat(messages=None), 400, "messages"),
    ("null-n", C, completion(n=None), 400, "n"),
    ("null-stream", CHAT, chat(stream=None), 400, "stream"),
    ("null-message-role", CHAT, chat(messages=[{"role": None, "content": "x"}]), 400, "messages"),
    ("null-detokenize-tokens", DETOK, {"model": MODEL_NAME, "tokens": None}, 400, "tokens"),
    # ------------------------------------------------------------- wrong types
    ("prompt-number", C, completion(prompt=5), 400, "prompt"),
    ("prompt-object", C, completion(prompt={"text": "x"}), 400, "prompt"),
    ("prompt-mixed-list", C, completion(prompt=["x", 5]), 400, "prompt"),
    ("prompt-float-ids", C, completion(prompt=[1.5, 2.0]), 400, "prompt"),
    ("max-tokens-string", C, completion(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-float", C, completion(max_tokens=4.5), 400, "max_tokens"),
    ("max-tokens-bool", C, completion(max_tokens=True), 400, "max_tokens"),
    ("temperature-string", C, completion(temperature="hot"), 400, "temperature"),
    ("n-float", C, completion(n=1.5), 400, "n"),
    ("stream-string", C, completion(stream="yes"), 400, "stream"),
    ("stop-number", C, completion(stop=5), 400, "stop"),
    ("stop-list-of-numbers", CHAT, chat(stop=[1, 2]), 400, "stop"),
    ("logprobs-bool", C, completion(logprobs=True), 400, "logprobs"),
    ("chat-logprobs-int", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("echo-string", C, completion(echo="no"), 400, "echo"),
    ("seed-string", C, completion(seed="1"), 400, "seed"),
    ("logit-bias-list", C, completion(logit_bias=[1, 2]), 400, "logit_bias"),
    ("logit-bias-value-string", C, completion(logit_bias={"5": "high"}), 400, "logit_bias"),
    ("stream-options-number", C, completion(stream=True, stream_options=1), 400,
     "stream_options"),
    ("messages-string", CHAT, chat(messages="hi"), 400, "messages"),
    ("message-unknown-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages"),
    ("message-content-number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages"),
    ("message-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "messages"),
    ("message-not-object", CHAT, chat(messages=["hi"]), 400, "messages"),
    ("stop-token-ids-string", C, completion(stop_token_ids="5"), 400, "stop_token_ids"),
    ("top-k-float", C, completion(top_k=2.5), 400, "top_k"),
    ("model-number", C, completion(model=7), 400, "model"),
    ("tokenize-prompt-list", TOK, {"model": MODEL_NAME, "prompt": ["a"]}, 400, "prompt"),
    ("detokenize-strings", DETOK, {"model": MODEL_NAME, "tokens": ["a"]}, 400, "tokens"),
    # ------------------------------------------------------------- out of range
    ("huge-n", C, completion(n=1_000_000), 400, "n"),
    ("zero-n", CHAT, chat(n=0), 400, "n"),
    ("huge-best-of", C, completion(best_of=1_000_000), 400, "best_of"),
    ("best-of-below-n", C, completion(n=3, best_of=2), 400, "best_of"),
    ("huge-logprobs", C, completion(logprobs=1000), 400, "logprobs"),
    ("negative-logprobs", C, completion(logprobs=-1), 400, "logprobs"),
    ("huge-top-logprobs", CHAT, chat(logprobs=True, top_logprobs=1000), 400, "top_logprobs"),
    ("huge-max-tokens", C, completion(max_tokens=10**9), 400, "max_tokens"),
    ("max-tokens-past-int64", C, completion(max_tokens=2**70), 400, "max_tokens"),
    ("zero-max-tokens-chat", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("negative-max-tokens", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("huge-max-completion-tokens", CHAT, chat(max_completion_tokens=10**9), 400,
     "max_completion_tokens"),
    ("negative-temperature", C, completion(temperature=-1), 400, "temperature"),
    ("huge-temperature", C, completion(temperature=1e308), 400, "temperature"),
    ("top-p-above-one", C, completion(top_p=1.5), 400, "top_p"),
    ("top-k-below-minus-one", C, completion(top_k=-2), 400, "top_k"),
    ("huge-top-k", C, completion(top_k=2**70), 400, "top_k"),
    ("seed-past-int64", C, completion(seed=2**70), 400, "seed"),
    ("negative-min-tokens", C, completion(min_tokens=-1), 400, "min_tokens"),
    ("min-tokens-above-max", C, completion(min_tokens=10, max_tokens=4), 400, "min_tokens"),
    ("presence-penalty", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("repetition-penalty-zero", C, completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("prompt-too-long", C, completion(prompt=[5] * MAX_MODEL_LEN), 400, "prompt"),
    # ------------------------------------------------------------- token ids
    ("negative-prompt-id", C, completion(prompt=[-1, 5]), 400, "prompt"),
    ("prompt-id-at-vocab", C, completion(prompt=[5, VOCAB]), 400, "prompt"),
    ("prompt-id-past-int64", C, completion(prompt=[5, 2**70]), 400, "prompt"),
    ("batched-ids-one-bad", C, completion(prompt=[[5, 6], [7, 10**9]]), 400, "prompt"),
    ("negative-stop-token-id", C, completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop-token-id-at-vocab", CHAT, chat(stop_token_ids=[VOCAB]), 400, "stop_token_ids"),
    ("logit-bias-out-of-vocab", C, completion(logit_bias={str(VOCAB): 5}), 400, "logit_bias"),
    ("logit-bias-negative-key", CHAT, chat(logit_bias={"-3": 5}), 400, "logit_bias"),
    ("logit-bias-word-key", C, completion(logit_bias={"hello": 5}), 400, "logit_bias"),
    ("logit-bias-huge-key", C, completion(logit_bias={str(2**70): 5}), 400, "logit_bias"),
    ("logit-bias-huge-value", C, completion(logit_bias={"5": 1000}), 400, "logit_bias"),
    ("detokenize-negative", DETOK, {"model": MODEL_NAME, "tokens": [-1]}, 400, "tokens"),
    ("detokenize-at-vocab", DETOK, {"model": MODEL_NAME, "tokens": [VOCAB]}, 400, "tokens"),
    ("detokenize-past-int64", DETOK, {"model": MODEL_NAME, "tokens": [2**70]}, 400, "tokens"),
    # ------------------------------------------------------------- empty and many
    ("empty-prompt-list", C, completion(prompt=[]), 400, "prompt"),
    ("empty-token-prompt", C, completion(prompt=[[]]), 400, "prompt"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages"),
    ("ten-thousand-prompts", C, completion(prompt=["Once upon a time"] * 10_000), 400,
     "prompt"),
    ("too-many-completions", C, completion(prompt=["a"] * 100, n=100), 400, "n"),
    ("five-stop-strings", C, completion(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty-stop-string", CHAT, chat(stop=[""]), 400, "stop"),
    ("tokenize-both", TOK, {"model": MODEL_NAME, "prompt": "a", "messages": MSGS}, 400,
     "prompt"),
    ("tokenize-neither", TOK, {"model": MODEL_NAME}, 400, "prompt"),
    # ------------------------------------------------------------- strings that are not text
    ("lone-surrogate-prompt", C, b'{"model": "stories", "prompt": "abc\\ud800def"}', 400,
     "prompt"),
    ("lone-surrogate-message", CHAT,
     b'{"model": "stories", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages"),
    ("lone-surrogate-stop", C,
     b'{"model": "stories", "prompt": "a", "stop": ["\\ud83d"]}', 400, "stop"),
    ("lone-surrogate-model", C, b'{"model": "\\ud800", "prompt": "a"}', 400, "model"),
    ("lone-surrogate-tokenize", TOK, b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("lone-surrogate-user", CHAT,
     b'{"messages": [{"role": "user", "content": "x"}], "user": "\\udc00"}', 400, "user"),
    # ------------------------------------------------------------- unsupported meaning
    ("suffix", C, completion(suffix="The end."), 400, "suffix"),
    ("zero-max-tokens-without-echo", C, completion(max_tokens=0), 400, "max_tokens"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("tool-choice-required", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("functions", CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("response-format-bad-schema", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}), 400,
     "response_format.json_schema.schema"),
    ("response-format-no-json-schema", C, completion(response_format={"type": "json_schema"}),
     400, "response_format.json_schema"),
    ("response-format-unknown-type", CHAT, chat(response_format={"type": "xml"}), 400,
     "response_format"),
    ("structured-outputs-two-kinds", C, completion(structured_outputs={
        "choice": ["a"], "regex": "b"}), 400, "structured_outputs"),
    ("structured-outputs-whitespace-pattern", C, completion(structured_outputs={
        "regex": "a", "whitespace_pattern": " "}), 400, "structured_outputs.whitespace_pattern"),
    ("guided-json-not-json", CHAT, chat(guided_json="{"), 400, "guided_json"),
    ("guided-regex-bad", C, completion(guided_regex="[ab"), 400, "guided_regex"),
    ("guided-choice-empty", C, completion(guided_choice=[]), 400, "guided_choice"),
    ("guided-grammar-bad", C, completion(guided_grammar="root ::= x"), 400, "guided_grammar"),
    ("guided-whitespace-pattern", C, completion(guided_whitespace_pattern=" "), 400,
     "guided_whitespace_pattern"),
    ("two-constraints", CHAT, chat(response_format={"type": "json_object"},
                                   guided_choice=["a"]), 400, "guided_choice"),
    ("chat-negative-prompt-logprobs", CHAT, chat(prompt_logprobs=-1), 400, "prompt_logprobs"),
    ("huge-prompt-logprobs", C, completion(prompt_logprobs=1000), 400, "prompt_logprobs"),
    ("chat-echo", CHAT, chat(echo=True), 400, "echo"),
    ("beam-search", C, completion(use_beam_search=True), 400, "use_beam_search"),
    ("allowed-token-ids", C, completion(allowed_token_ids=[5]), 400, "allowed_token_ids"),
    ("audio-modality", CHAT, chat(modalities=["text", "audio"]), 400, "modalities"),
    ("assistant-tool-calls", CHAT, chat(messages=[*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
     400, "messages"),
    ("tokenize-tools", TOK, {"model": MODEL_NAME, "messages": MSGS, "tools": [{}]}, 400,
     "tools"),
]


@pytest.mark.parametrize("path,body", [
    (CHAT, chat(response_format={"type": "text"}, tool_choice="none", parallel_tool_calls=True,
                store=False, metadata={"k": "v"}, service_tier="auto", unknown_field=1)),
    (C, completion(prompt_logprobs=None, guided_json=None, some_new_field={"a": 1})),
])
def test_fields_that_keep_the_meaning_are_accepted(engine_server, path, body):
    r = engine_server.post(path, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,status,param",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_input_is_an_enveloped_4xx_naming_the_field(engine_server, path, body, status,
                                                        param):
    s = engine_server
    if isinstance(body, bytes):
        r = s.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = s.post(path, body)
    s.assert_error(r, status, param)


def test_unknown_model_is_a_404_naming_model(engine_server):
    s = engine_server
    s.assert_error(s.post(C, completion(model="gpt-4")), 404, "model", code="model_not_found")
    s.assert_error(s.post(CHAT, chat(model="gpt-4")), 404, "model", code="model_not_found")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_declared_json_is_a_415(engine_server, content_type):
    s = engine_server
    body = json.dumps(completion()).encode()
    r = s.post(C, content=body, headers={"Content-Type": content_type})
    s.assert_error(r, 415, None, code="unsupported_media_type")


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8",
                                          "application/vnd.api+json"])
def test_json_bodies_are_read_whatever_json_type_they_declare(engine_server, content_type):
    s = engine_server
    headers = {} if content_type is None else {"Content-Type": content_type}
    with s.client() as c:
        request = c.build_request("POST", C, content=json.dumps(completion()).encode(),
                                  headers=headers)
        if content_type is None:
            request.headers.pop("Content-Type", None)
        r = c.send(request)
    assert r.status_code == 200, r.text


def test_an_oversized_body_is_a_413(engine_server):
    s = engine_server
    huge = completion(prompt="x" * (17 << 20))  # the default limit is 16 MiB
    s.assert_error(s.post(C, huge), 413, None, code="request_too_large")


def test_the_server_serves_after_the_corpus(engine_server):
    s = engine_server
    s.wait_settled()
    out = s.complete(prompt="Once upon a time", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] == 4

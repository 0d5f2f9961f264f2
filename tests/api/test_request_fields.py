"""Request fields whose handling OpenAI and vLLM clients rely on, over the fake engine: which
stop ended a choice (`stop_reason`), and `stream_options` only with `stream`."""

from __future__ import annotations

import pytest

PROMPT = "Once upon a time"
MSGS = [{"role": "user", "content": PROMPT}]


def _fake_token_ids(server, prompt: str) -> list[int]:
    """The fake's output: the prompt's token ids, repeated."""
    return server.tokenize(prompt)["tokens"]


def test_stop_token_id_is_the_stop_reason(fake_server):
    s = fake_server
    stop_id = _fake_token_ids(s, PROMPT)[2]
    out = s.complete(prompt=PROMPT, max_tokens=20, stop_token_ids=[stop_id])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
    chat = s.chat(messages=MSGS, max_tokens=20, stop_token_ids=[stop_id])["choices"][0]
    assert chat["finish_reason"] == "stop" and chat["stop_reason"] == stop_id


def test_stop_string_is_the_stop_reason_and_length_has_none(fake_server):
    s = fake_server
    choice = s.complete(prompt=PROMPT, max_tokens=20, stop=[" upon"])["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " upon"
    choice = s.complete(prompt=PROMPT, max_tokens=3)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": MSGS}),
])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_is_a_400(fake_server, path, body, stream):
    s = fake_server
    body = {"model": s.model_name, "max_tokens": 2, **body,
            "stream_options": {"include_usage": True}}
    if stream is not None:
        body["stream"] = stream
    s.assert_error(s.post(path, body), 400, "stream_options")
    assert s.complete(prompt=PROMPT, max_tokens=2)["choices"]  # still serving

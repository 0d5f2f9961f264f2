"""POST /v1/chat/completions through the tokenizer's chat template: raw httpx and the SDK
(sync, async, streaming), logprobs, usage, default length, stop strings."""

from __future__ import annotations

import asyncio

import pytest

MESSAGES = [{"role": "system", "content": "You tell stories."},
            {"role": "user", "content": "Once upon a time"}]
MAX_MODEL_LEN = 512


def test_chat_raw(server):
    out = server.chat(messages=MESSAGES, max_tokens=8, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    assert out["model"] == server.model_name
    [choice] = out["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    n_prompt = server.tokenize(messages=MESSAGES)["count"]
    usage = out["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8


def test_chat_prompt_is_the_rendered_template(server):
    """The chat prompt is exactly the template's text: the same greedy output as a completion
    of the rendered conversation's token ids."""
    ids = server.tokenize(messages=MESSAGES)["tokens"]
    text = server.post("/detokenize", {"tokens": ids}).json()["prompt"]
    assert text == "system: You tell stories.\nuser: Once upon a time\nassistant:"
    chat = server.chat(messages=MESSAGES, max_tokens=8, temperature=0)
    completion = server.complete(prompt=ids, max_tokens=8, temperature=0)
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert chat["usage"] == completion["usage"]


def test_chat_content_parts_and_names(server):
    parts = [{"role": "user", "name": "kid",
              "content": [{"type": "text", "text": "Once upon "}, {"type": "text",
                                                                  "text": "a time"}]}]
    plain = [{"role": "user", "content": "Once upon a time"}]
    a = server.chat(messages=parts, max_tokens=4, temperature=0)
    b = server.chat(messages=plain, max_tokens=4, temperature=0)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_chat_sdk_sync(server, oai):
    out = oai.chat.completions.create(model=server.model_name, messages=MESSAGES,
                                      max_tokens=8, temperature=0)
    raw = server.chat(messages=MESSAGES, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert out.usage.prompt_tokens == raw["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == raw["usage"]["completion_tokens"]


def test_chat_sdk_sync_stream(server, oai):
    stream = oai.chat.completions.create(model=server.model_name, messages=MESSAGES,
                                         max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    raw = server.chat(messages=MESSAGES, max_tokens=10, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == raw["choices"][0]["message"]["content"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == raw["usage"]["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == raw["usage"]["completion_tokens"]
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_chat_sdk_async_and_stream(server):
    async def main():
        client = server.async_openai()
        async with client:
            out = await client.chat.completions.create(
                model=server.model_name, messages=MESSAGES, max_completion_tokens=6,
                temperature=0)
            stream = await client.chat.completions.create(
                model=server.model_name, messages=MESSAGES, max_completion_tokens=6,
                temperature=0, stream=True)
            chunks = [c async for c in stream]
        return out, chunks

    out, chunks = asyncio.run(main())
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == out.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 6


def test_chat_stream_raw_framing(server):
    chunks, raw = server.stream("/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == []
    n_prompt = server.tokenize(messages=MESSAGES)["count"]
    assert chunks[-1]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6,
                                   "total_tokens": n_prompt + 6}


def test_chat_n_choices(server):
    out = server.chat(messages=MESSAGES, n=3, max_tokens=5, temperature=0.8, seed=3,
                      ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 15
    chunks, _ = server.stream("/v1/chat/completions", {"messages": MESSAGES, "n": 2,
                                                       "max_tokens": 3, "temperature": 0})
    roles = {c["choices"][0]["index"] for c in chunks
             if c["choices"][0]["delta"].get("role") == "assistant"}
    assert roles == {0, 1}


def test_max_completion_tokens_wins_over_max_tokens(server):
    out = server.chat(messages=MESSAGES, max_tokens=9, max_completion_tokens=3,
                      temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["finish_reason"] == "length"


def _long_conversation(server, repeats: int) -> tuple[list[dict], int]:
    messages = [{"role": "user", "content": " ".join(["Lily ran to the park."] * repeats)}]
    return messages, server.tokenize(messages=messages)["count"]


def test_chat_without_max_tokens_runs_to_eos_or_the_end_of_the_context(server):
    """No max_tokens in chat: the default is the rest of the context, not 16 (a long
    conversation keeps the run short)."""
    messages, n_prompt = _long_conversation(server, 50)
    assert 440 < n_prompt < 480
    out = server.chat(messages=messages, temperature=0)
    choice, usage = out["choices"][0], out["usage"]
    assert usage["prompt_tokens"] == n_prompt
    if choice["finish_reason"] == "length":
        assert n_prompt + usage["completion_tokens"] == MAX_MODEL_LEN
    else:
        assert choice["finish_reason"] == "stop"
        assert n_prompt + usage["completion_tokens"] < MAX_MODEL_LEN


def test_chat_without_max_tokens_fills_the_context_with_ignore_eos(server):
    messages, n_prompt = _long_conversation(server, 50)
    out = server.chat(messages=messages, temperature=0, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["completion_tokens"] == MAX_MODEL_LEN - n_prompt > 16


@pytest.mark.parametrize("num_top", [0, 2, 5])
def test_chat_logprobs(server, num_top):
    out = server.chat(messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                      top_logprobs=num_top, ignore_eos=True)
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 5
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) >= {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert entry["logprob"] <= 0
        tops = entry["top_logprobs"]
        assert len(tops) == num_top
        for top in tops:
            assert top["bytes"] == list(top["token"].encode("utf-8"))
            assert top["logprob"] <= entry["logprob"] + 1e-4  # greedy picks the best
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops),
                                                      reverse=True)
        if tops:
            assert tops[0]["token"] == entry["token"]


def test_chat_logprobs_with_sdk_stream(server, oai):
    stream = oai.chat.completions.create(model=server.model_name, messages=MESSAGES,
                                         max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=2, stream=True,
                                         extra_body={"ignore_eos": True})
    entries = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            entries += chunk.choices[0].logprobs.content
    assert len(entries) == 4
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_chat_without_logprobs_has_null_logprobs(server):
    out = server.chat(messages=MESSAGES, max_tokens=2)
    assert out["choices"][0]["logprobs"] is None


def test_chat_stop_string(server):
    free = server.chat(messages=MESSAGES, max_tokens=16, temperature=0, ignore_eos=True)
    text = free["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 4, text
    stop = words[2]
    expected = text[:text.find(stop)]
    out = server.chat(messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert out["choices"][0]["message"]["content"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks, _ = server.stream("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 16,
                                                       "temperature": 0, "stop": stop})
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

"""Prompt logprobs over the fake engine (which scores every prompt token -1.0, rank 1): on
completions `echo` with `logprobs` (and `max_tokens: 0`) and vLLM's `prompt_logprobs`, for
several prompts and n > 1; on chat vLLM's top-level `prompt_logprobs`; streamed and not."""

from __future__ import annotations

import pytest

C = "/v1/completions"
PROMPTS = ["Once upon a time", "The dog ran"]


def _ids(s, prompt: str) -> list[int]:
    return s.tokenize(prompt)["tokens"]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs(fake_server, max_tokens):
    s = fake_server
    out = s.complete(prompt=PROMPTS, n=2, echo=True, logprobs=2, max_tokens=max_tokens,
                     ignore_eos=True)
    assert len(out["choices"]) == 4
    for choice in out["choices"]:
        prompt = PROMPTS[choice["index"] // 2]
        num = len(_ids(s, prompt))
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
            == len(lp["text_offset"]) == num + max_tokens
        assert lp["token_logprobs"][:num] == [None] + [-1.0] * (num - 1)
        assert lp["top_logprobs"][0] is None
        assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"][1:num])  # top 2 + its own
        assert choice["finish_reason"] == "length"
        if max_tokens == 0:
            assert choice["text"] == prompt
    assert out["usage"]["completion_tokens"] == 4 * max_tokens


def test_max_tokens_0_needs_echo(fake_server):
    fake_server.assert_error(fake_server.post(C, {"model": fake_server.model_name,
                                                  "prompt": "x", "max_tokens": 0}),
                             400, "max_tokens")


def test_vllm_prompt_logprobs(fake_server):
    s = fake_server
    ids = _ids(s, PROMPTS[0])
    choice = s.complete(prompt=ids, prompt_logprobs=1, max_tokens=2)["choices"][0]
    got = choice["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for p in range(1, len(ids)):
        assert got[p][str(ids[p])]["logprob"] == -1.0 and got[p][str(ids[p])]["rank"] == 1
        assert all(isinstance(e["decoded_token"], str) for e in got[p].values())
    assert "prompt_logprobs" not in s.complete(prompt=ids, max_tokens=2)["choices"][0]


def test_streamed_echo_waits_for_the_prompts_logprobs(fake_server):
    s = fake_server
    chunks, raw = s.stream(C, {"prompt": PROMPTS, "n": 2, "echo": True, "logprobs": 1,
                               "prompt_logprobs": 0, "max_tokens": 2, "ignore_eos": True})
    assert raw.rstrip().endswith("data: [DONE]")
    by_choice: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_choice.setdefault(choice["index"], []).append(choice)
    assert sorted(by_choice) == [0, 1, 2, 3]
    for index, parts in by_choice.items():
        prompt = PROMPTS[index // 2]
        num = len(_ids(s, prompt))
        first = parts[0]
        assert first["text"] == prompt
        assert first["logprobs"]["token_logprobs"] == [None] + [-1.0] * (num - 1)
        assert len(first["prompt_logprobs"]) == num
        assert all("prompt_logprobs" not in p for p in parts[1:])
        assert "".join(p["text"] for p in parts).startswith(prompt)
        assert sum(len(p["logprobs"]["tokens"]) for p in parts) == num + 2
        assert parts[-1]["finish_reason"] == "length"


def test_streamed_echo_only(fake_server):
    chunks, _ = fake_server.stream(C, {"prompt": PROMPTS[0], "echo": True, "logprobs": 0,
                                       "max_tokens": 0})
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == PROMPTS[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_prompt_logprobs(fake_server):
    s = fake_server
    messages = [{"role": "user", "content": "Once upon a time"}]
    num = len(s.tokenize(messages=messages)["tokens"])
    out = s.chat(messages=messages, n=2, prompt_logprobs=0, max_tokens=2)
    got = out["prompt_logprobs"]
    assert got[0] is None and len(got) == num
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] == 1 for entry in got[1:])
    assert "prompt_logprobs" not in s.chat(messages=messages, max_tokens=2)
    chunks, _ = s.stream("/v1/chat/completions", {"messages": messages, "prompt_logprobs": 1,
                                                  "max_tokens": 3})
    carrying = [c for c in chunks if "prompt_logprobs" in c]
    assert len(carrying) == 1  # with the first output, once
    streamed = carrying[0]["prompt_logprobs"]
    assert streamed[0] is None and len(streamed) == num
    assert all(1 <= len(entry) <= 2 for entry in streamed[1:])  # its own token, and the top 1

"""POST /v1/completions: prompt forms, n, echo, logprobs, streaming, usage and stop strings,
through raw httpx and the official SDK (sync, async, streaming)."""

from __future__ import annotations

import asyncio

import pytest

PROMPT = "Once upon a time"
# The bundled model's greedy continuation of PROMPT.
GREEDY = (", there was a little girl named Lily. She loved to play outside in the park. "
          "One day, she saw a big, red ball.")


def greedy(server, prompt=PROMPT, **body) -> dict:
    return server.complete(prompt=prompt, temperature=0, **body)


# ---------------------------------------------------------------------- basics and usage
def test_greedy_completion_raw(server):
    out = greedy(server, max_tokens=24)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert out["model"] == server.model_name
    assert isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["text"].startswith(", there was a little girl")
    assert GREEDY.startswith(choice["text"])
    n_prompt = server.tokenize(PROMPT)["count"]
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 24,
                            "total_tokens": n_prompt + 24}


def test_default_max_tokens_is_16(server):
    out = server.complete(prompt="The dog", temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16
    assert out["choices"][0]["finish_reason"] == "length"


def test_completion_tokens_count_the_tokens_of_the_text(server):
    """completion_tokens equals the number of tokens generated (checked by re-tokenizing the
    greedy text, which this model's tokenizer round-trips for plain words)."""
    out = greedy(server, max_tokens=12)
    text = out["choices"][0]["text"]
    ids = server.post("/tokenize", {"prompt": PROMPT + text}).json()["tokens"]
    prompt_ids = server.tokenize(PROMPT)["tokens"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert len(ids) - len(prompt_ids) == out["usage"]["completion_tokens"] == 12


def test_sdk_sync(server, oai):
    out = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10,
                                 temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == greedy(server, max_tokens=10)["choices"][0]["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10
    assert out.usage.prompt_tokens == server.tokenize(PROMPT)["count"]


def test_sdk_async_and_async_stream(server):
    async def main():
        client = server.async_openai()
        async with client:
            out = await client.completions.create(model=server.model_name, prompt=PROMPT,
                                                  max_tokens=10, temperature=0)
            stream = await client.completions.create(
                model=server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
        return out, chunks

    out, chunks = asyncio.run(main())
    expected = greedy(server, max_tokens=10)["choices"][0]["text"]
    assert out.choices[0].text == expected
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_sdk_sync_stream(server, oai):
    stream = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=12,
                                    temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == \
        greedy(server, max_tokens=12)["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


# ---------------------------------------------------------------------- prompt forms
def test_prompt_forms_agree(server):
    ids = server.tokenize(PROMPT)["tokens"]
    by_string = greedy(server, max_tokens=8)
    by_list = greedy(server, prompt=[PROMPT], max_tokens=8)
    by_ids = greedy(server, prompt=ids, max_tokens=8)
    by_id_lists = greedy(server, prompt=[ids], max_tokens=8)
    expected = by_string["choices"][0]["text"]
    assert expected == GREEDY[:len(expected)] and expected
    for out in (by_list, by_ids, by_id_lists):
        assert [c["text"] for c in out["choices"]] == [expected]
        assert out["usage"] == by_string["usage"]


def test_several_prompts_and_n_index_choices(server):
    prompts = [PROMPT, "The little dog", "Tom had a"]
    n = 3
    out = server.complete(prompt=prompts, n=n, max_tokens=6, temperature=0, ignore_eos=True)
    choices = out["choices"]
    assert [c["index"] for c in choices] == list(range(len(prompts) * n))
    for i, prompt in enumerate(prompts):
        alone = greedy(server, prompt=prompt, max_tokens=6, ignore_eos=True)
        for j in range(n):
            assert choices[i * n + j]["text"] == alone["choices"][0]["text"], (i, j)
    n_prompt = sum(server.tokenize(p)["count"] for p in prompts)
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 9 * 6,
                            "total_tokens": n_prompt + 9 * 6}


def test_token_id_list_prompts_with_n_sampled(server):
    ids_a = server.tokenize(PROMPT)["tokens"]
    ids_b = server.tokenize("The cat")["tokens"]
    out = server.complete(prompt=[ids_a, ids_b], n=2, max_tokens=5, temperature=1.0, seed=7,
                          ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == len(ids_a) + len(ids_b)
    assert out["usage"]["completion_tokens"] == 4 * 5


def test_n_in_a_stream_indexes_choices(server):
    chunks, _ = server.stream("/v1/completions", {"prompt": [PROMPT, "The cat"], "n": 2,
                                                  "max_tokens": 5, "temperature": 0,
                                                  "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            assert choice["index"] not in finish
            finish[choice["index"]] = choice["finish_reason"]
    assert sorted(texts) == sorted(finish) == [0, 1, 2, 3]
    whole = server.complete(prompt=[PROMPT, "The cat"], n=2, max_tokens=5, temperature=0)
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]
    assert chunks[-1]["usage"] == whole["usage"]


# ---------------------------------------------------------------------- echo
def test_echo(server):
    out = greedy(server, max_tokens=6, echo=True)
    plain = greedy(server, max_tokens=6)["choices"][0]["text"]
    assert out["choices"][0]["text"] == PROMPT + plain
    chunks, _ = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 6,
                                                  "temperature": 0, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + plain


# ---------------------------------------------------------------------- prompt logprobs
@pytest.fixture(scope="module")
def offline_prompt_logprobs():
    """The offline engine's prompt logprobs over the same weights (the server's model is a
    copy of the bundled one)."""
    from server import LLM, SamplingParams

    llm = LLM(kv_cache_memory=1 << 24)

    def score(prompt_ids: list[int], num: int) -> list:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=num)
        return llm.generate([prompt_ids], params)[0].prompt_logprobs
    return score


def test_echo_with_logprobs_scores_the_prompt(server, offline_prompt_logprobs):
    """lm-evaluation-harness' loglikelihood request: token ids, echo, logprobs, max_tokens 0
    or 1. The prompt's logprobs are the engine's, the first token unscored."""
    ids = server.tokenize(PROMPT + " there was a dog")["tokens"]
    echoed = server.post("/detokenize", {"model": server.model_name,
                                         "tokens": ids}).json()["prompt"]  # with its BOS
    expected = offline_prompt_logprobs(ids, 1)
    for max_tokens in (0, 1):
        out = server.complete(prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
                              temperature=0)
        choice = out["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for p in range(1, len(ids)):
            assert lp["token_logprobs"][p] == pytest.approx(expected[p][ids[p]], abs=1e-5)
            top = lp["top_logprobs"][p]  # the most likely token, and the prompt's own
            assert 1 <= len(top) <= 2
            assert max(top.values()) == pytest.approx(max(expected[p].values()), abs=1e-5)
        assert out["usage"]["completion_tokens"] == max_tokens
        assert choice["finish_reason"] == "length"
        if max_tokens == 0:
            assert choice["text"] == echoed
    streamed, raw = server.stream("/v1/completions", {"prompt": ids, "echo": True,
                                                      "logprobs": 1, "max_tokens": 2,
                                                      "temperature": 0})
    first = streamed[0]["choices"][0]
    assert first["text"] == echoed
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [expected[p][ids[p]] for p in range(1, len(ids))], abs=1e-5)
    assert raw.rstrip().endswith("data: [DONE]")


def test_vllm_prompt_logprobs(server, offline_prompt_logprobs):
    ids = server.tokenize("The little dog ran")["tokens"]
    expected = offline_prompt_logprobs(ids, 2)
    choice = server.complete(prompt=ids, prompt_logprobs=2, max_tokens=2,
                             temperature=0)["choices"][0]
    got = choice["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for p in range(1, len(ids)):
        assert {int(t) for t in got[p]} == set(expected[p])
        for t, entry in got[p].items():
            assert entry["logprob"] == pytest.approx(expected[p][int(t)], abs=1e-5)
            assert entry["rank"] >= 1 and isinstance(entry["decoded_token"], str)
        own = got[p][str(ids[p])]
        better = sum(lp > expected[p][ids[p]] for lp in expected[p].values())
        assert own["rank"] == better + 1 if better < 2 else own["rank"] > 2


# ---------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("num", [0, 1, 3])
def test_logprobs(server, num):
    out = greedy(server, max_tokens=6, logprobs=num)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    text = choice["text"]
    tokens, token_lps = lp["tokens"], lp["token_logprobs"]
    tops, offsets = lp["top_logprobs"], lp["text_offset"]
    assert len(tokens) == len(token_lps) == len(tops) == len(offsets) == 6
    assert "".join(tokens) == text
    assert offsets[0] == 0
    for i in range(len(tokens)):
        assert text[offsets[i]:offsets[i] + len(tokens[i])] == tokens[i]
        if i:
            assert offsets[i] == offsets[i - 1] + len(tokens[i - 1])
    for token, token_lp, top in zip(tokens, token_lps, tops):
        assert isinstance(token_lp, float) and token_lp <= 0
        assert isinstance(top, dict) and len(top) <= max(num, 1)
        if num:
            assert len(top) >= 1
            # Greedy: the sampled token is the most likely one.
            assert top[token] == pytest.approx(token_lp, abs=1e-4)
            assert max(top.values()) == pytest.approx(token_lp, abs=1e-4)
            assert all(v <= 0 for v in top.values())


def test_logprobs_in_a_stream(server):
    chunks, _ = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 8,
                                                  "temperature": 0, "logprobs": 2})
    whole = greedy(server, max_tokens=8, logprobs=2)["choices"][0]["logprobs"]
    tokens, offsets, lps = [], [], []
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        assert lp is not None
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
            == len(lp["text_offset"])
        tokens += lp["tokens"]
        offsets += lp["text_offset"]
        lps += lp["token_logprobs"]
    assert tokens == whole["tokens"]
    assert offsets == whole["text_offset"]
    assert lps == pytest.approx(whole["token_logprobs"], abs=1e-4)


# ---------------------------------------------------------------------- streaming
def test_stream_framing_ids_and_usage(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "stream_options": {"include_usage": True}}
    chunks, raw = server.stream("/v1/completions", body)
    assert raw.startswith("data: {")
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == server.model_name
               for c in chunks)
    *content, last = chunks
    assert last["choices"] == []
    n_prompt = server.tokenize(PROMPT)["count"]
    assert last["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12,
                             "total_tokens": n_prompt + 12}
    assert all(len(c["choices"]) == 1 for c in content)
    assert all(c.get("usage") is None for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    text = "".join(c["choices"][0]["text"] for c in content)
    assert text == greedy(server, max_tokens=12)["choices"][0]["text"]


def test_stream_without_include_usage_has_no_usage_chunk(server):
    chunks, _ = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


@pytest.mark.parametrize("prompt", [PROMPT, "Lily and Tom went to the"])
def test_streamed_text_equals_non_streamed(server, prompt):
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
    chunks, _ = server.stream("/v1/completions", body)
    whole = server.complete(**body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


# ---------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("stop", ["Lily", ["Lily"], ["zzz", "girl named", "qqq"], "e gi",
                                  [" park", "little"]])
def test_stop_strings_trim_and_finish(server, stop):
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(GREEDY.find(s) for s in stops if s in GREEDY)
    expected = GREEDY[:cut]
    out = greedy(server, max_tokens=16, stop=stop)
    choice = out["choices"][0]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 16

    chunks, raw = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 16,
                                                    "temperature": 0, "stop": stop})
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    for s in stops:
        assert s not in raw.replace('"stop_reason"', ""), f"stop string {s!r} leaked"
        assert all(s not in p for p in pieces)


def test_stop_string_spanning_tokens(server):
    """'tle girl na' starts inside ' little' and ends inside ' named': three tokens."""
    stop = "tle girl na"
    expected = GREEDY[:GREEDY.find(stop)]
    out = greedy(server, max_tokens=16, stop=stop)
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks, _ = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 16,
                                                  "temperature": 0, "stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_stop_not_reached_finishes_with_length(server):
    out = greedy(server, max_tokens=5, stop=["Lily"])
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == GREEDY[:len(out["choices"][0]["text"])]


def test_stop_with_sdk_stream(server, oai):
    stream = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=16,
                                    temperature=0, stop=["named"], stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == GREEDY[:GREEDY.find("named")]

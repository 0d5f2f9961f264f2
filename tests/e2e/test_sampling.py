"""Sampling parameters over HTTP: seed, temperature, lengths, logit_bias, nucleus and
penalties, and the vLLM extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids); unknown fields are ignored."""

from __future__ import annotations

PROMPT = "Once upon a time"
GREEDY = (", there was a little girl named Lily. She loved to play outside in the park. "
          "One day, she saw a big, red ball.")
EOS_IDS = (2, 1)


def text_of(out: dict, i: int = 0) -> str:
    return out["choices"][i]["text"]


def token_id(server, text: str) -> int:
    """The id of the single token `text` encodes to (without BOS)."""
    ids = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    ids = [t for t in ids["tokens"] if server.post("/detokenize", {"tokens": [t]}).json()
           ["prompt"].strip()]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_temperature_zero_is_deterministic(server):
    a = server.complete(prompt=PROMPT, max_tokens=12, temperature=0)
    b = server.complete(prompt=PROMPT, max_tokens=12, temperature=0, seed=99)
    assert text_of(a) == text_of(b) == GREEDY[:len(text_of(a))]


def test_same_seed_same_sample(server):
    body = dict(prompt=PROMPT, max_tokens=10, temperature=1.0, ignore_eos=True)
    a = server.complete(seed=1234, **body)
    b = server.complete(seed=1234, **body)
    assert text_of(a) == text_of(b)
    others = {text_of(server.complete(seed=s, **body)) for s in (1, 2, 3)}
    assert len(others | {text_of(a)}) > 1, "different seeds always give the same sample"


def test_seeded_n_choices_differ_and_repeat(server):
    body = dict(prompt=PROMPT, n=3, max_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    a = server.complete(**body)
    b = server.complete(**body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1


def test_seed_with_the_sdk(server, oai):
    kwargs = dict(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=1.0,
                  seed=5, extra_body={"ignore_eos": True})
    a = oai.completions.create(**kwargs)
    b = oai.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text


def test_max_tokens_respected(server, oai):
    for m in (1, 3, 7):
        out = server.complete(prompt=PROMPT, max_tokens=m, temperature=0.7, seed=m,
                              ignore_eos=True)
        assert out["usage"]["completion_tokens"] == m
        assert out["choices"][0]["finish_reason"] == "length"
    out = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=4,
                                 temperature=0)
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
    chat = oai.chat.completions.create(model=server.model_name, max_completion_tokens=3,
                                       messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"


def test_logit_bias_forces_a_token(server):
    lily = token_id(server, "Lily")
    out = server.complete(prompt=PROMPT, max_tokens=5, temperature=1.0, seed=0,
                          logit_bias={str(lily): 100}, logprobs=0)
    tokens = out["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 5 and all(t.strip() == "Lily" for t in tokens), tokens
    assert text_of(out).split() == ["Lily"] * 5


def test_logit_bias_bans_a_token(server):
    comma = token_id(server, ",")
    assert GREEDY.startswith(",")
    out = server.complete(prompt=PROMPT, max_tokens=3, temperature=0,
                          logit_bias={str(comma): -100})
    assert not text_of(out).startswith(",")


def test_logit_bias_with_the_sdk_and_chat(server, oai):
    lily = token_id(server, "Lily")
    out = oai.chat.completions.create(model=server.model_name, max_tokens=3,
                                      messages=[{"role": "user", "content": "Hi"}],
                                      logit_bias={str(lily): 100}, temperature=0.5)
    assert out.choices[0].message.content.split() == ["Lily"] * 3


def test_tiny_top_p_top_k_1_and_min_p_1_are_greedy(server):
    greedy = text_of(server.complete(prompt=PROMPT, max_tokens=12, temperature=0))
    for extra in ({"top_p": 1e-6}, {"top_p": 0.0}, {"top_k": 1}, {"min_p": 1.0}):
        hot = server.complete(prompt=PROMPT, max_tokens=12, temperature=1.5, seed=11, **extra)
        assert text_of(hot) == greedy, extra


def test_penalties_accepted_and_effective(server):
    body = dict(prompt=PROMPT, max_tokens=40, temperature=0)
    plain = text_of(server.complete(**body))
    accepted = server.complete(presence_penalty=0.5, frequency_penalty=-0.5, top_p=0.9,
                               top_k=-1, min_p=0.0, repetition_penalty=1.0, seed=1,
                               **{**body, "max_tokens": 4})
    assert accepted["usage"]["completion_tokens"] <= 4
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"repetition_penalty": 2.0}):
        penalised = text_of(server.complete(**body, **penalty))
        assert penalised != plain, f"{penalty} changed nothing: {plain!r}"


def test_min_tokens_blocks_eos(server):
    eos_bias = {str(t): 100 for t in EOS_IDS}
    quick = server.complete(prompt=PROMPT, max_tokens=10, temperature=0, logit_bias=eos_bias)
    assert quick["choices"][0]["finish_reason"] == "stop"
    assert quick["usage"]["completion_tokens"] <= 1
    held = server.complete(prompt=PROMPT, max_tokens=10, temperature=0, logit_bias=eos_bias,
                           min_tokens=5)
    assert held["choices"][0]["finish_reason"] == "stop"
    assert 5 <= held["usage"]["completion_tokens"] <= 6
    assert text_of(held).strip()


def test_ignore_eos(server):
    eos_bias = {"2": 100}
    out = server.complete(prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=eos_bias,
                          ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 6


def test_stop_token_ids(server):
    was = token_id(server, "was")
    out = server.complete(prompt=PROMPT, max_tokens=10, temperature=0, stop_token_ids=[was])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3  # ",", " there", " was"
    assert choice["text"] in (", there", ", there was")
    chat = server.chat(messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                       temperature=0, logit_bias={str(was): 100}, stop_token_ids=[was])
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"]["completion_tokens"] == 1


def test_unknown_fields_are_ignored(server, oai):
    body = dict(prompt=PROMPT, max_tokens=6, temperature=0)
    plain = server.complete(**body)
    noisy = server.complete(**body, frobnicate=True, nested={"a": [1, 2]}, user="e2e",
                            best_of=1, top_a=0.3)
    assert text_of(noisy) == text_of(plain)
    chat = server.chat(messages=[{"role": "user", "content": "Hi", "extra": 1}], max_tokens=2,
                       tools_whatever=[1], parallel_tool_calls=False)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    sdk = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6,
                                 temperature=0, extra_body={"some_future_field": {"x": 1}})
    assert sdk.choices[0].text == text_of(plain)

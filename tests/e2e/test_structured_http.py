"""Structured outputs over HTTP, on chat and completions: OpenAI's response_format, vLLM's
structured_outputs and its guided_* names. Every constrained output is checked against its
constraint (JSON with jsonschema), streamed and not, with n > 1 and stop strings; a bad
constraint is a 400 naming its field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.http_client import assert_error

SCHEMA = {"type": "object",
          "properties": {"answer": {"enum": ["yes", "no"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
LONG = {"max_tokens": 200, "temperature": 1.0, "seed": 11}


def chat_texts(out: dict) -> list[str]:
    return [c["message"]["content"] for c in out["choices"]]


def streamed_texts(chunks: list[dict], n: int, key: str) -> list[str]:
    texts = [""] * n
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = (choice["delta"].get("content") if key == "delta" else choice["text"])
            texts[choice["index"]] += piece or ""
    return texts


def test_chat_json_schema(server):
    out = server.chat(messages=MESSAGES, response_format=RESPONSE_FORMAT, n=3, **LONG)
    for choice, text in zip(out["choices"], chat_texts(out)):
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(text), SCHEMA)


def test_chat_json_schema_streamed(server):
    chunks, _ = server.stream("/v1/chat/completions", {
        "messages": MESSAGES, "response_format": RESPONSE_FORMAT, "n": 2, **LONG})
    for text in streamed_texts(chunks, 2, "delta"):
        jsonschema.validate(json.loads(text), SCHEMA)
    assert {c["choices"][0]["finish_reason"] for c in chunks if c["choices"]} >= {"stop"}


def test_chat_json_object_with_logit_bias(server):
    """A tiny model's free JSON may run past any max_tokens; a bias on "}" (byte token 0x7D)
    ends the object as soon as the grammar allows it, and the grammar still holds."""
    out = server.chat(messages=MESSAGES, response_format={"type": "json_object"},
                      logit_bias={"128": 100}, **LONG)
    assert json.loads(chat_texts(out)[0]) == {}
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field, value, check", [
    ("structured_outputs", {"regex": "[0-9]{2}-[a-z]{2}"},
     lambda t: re.fullmatch("[0-9]{2}-[a-z]{2}", t)),
    ("structured_outputs", {"choice": ["red", "green", 'say "blue"']},
     lambda t: t in ("red", "green", 'say "blue"')),
    ("structured_outputs", {"grammar": 'root ::= "up" | "down"'},
     lambda t: t in ("up", "down")),
    ("structured_outputs", {"json": json.dumps(SCHEMA), "disable_any_whitespace": True},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None and " \n" not in t),
    ("guided_json", SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ("guided_regex", "[ab]{3}", lambda t: re.fullmatch("[ab]{3}", t)),
    ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
    ("guided_grammar", 'start: "x" "y"', lambda t: t == "xy"),
    ("response_format", RESPONSE_FORMAT,
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
])
def test_completions_constraints(server, field, value, check):
    out = server.complete(prompt="Once upon a time", n=2, **{field: value}, **LONG)
    for choice in out["choices"]:
        assert choice["finish_reason"] == "stop", choice
        assert check(choice["text"]), choice["text"]
    chunks, _ = server.stream("/v1/completions", {"prompt": "Once upon a time",
                                                  field: value, **LONG})
    assert check(streamed_texts(chunks, 1, "text")[0])


def test_a_stop_string_still_cuts_a_constrained_output(server):
    out = server.complete(prompt="Once", structured_outputs={"choice": ["abc-def"]},
                          stop=["-"], **LONG)
    assert out["choices"][0]["text"] == "abc" and out["choices"][0]["stop_reason"] == "-"


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema",
     "Unsupported type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
     "response_format.json_schema", "needs its json_schema"),
    ("/v1/completions", {"structured_outputs": {"regex": "(("}}, "structured_outputs.regex",
     "parenthesis"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= nothing"}},
     "structured_outputs.grammar", "not defined"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs", "exactly one"),
    ("/v1/completions", {"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"guided_json": "[1, 2]"}, "guided_json", "schema object"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice",
     "one structured-outputs constraint"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"},
                              "guided_regex": "a"}, "guided_regex", "one structured"),
])
def test_a_bad_constraint_is_a_400_naming_its_field(server, path, body, param, words):
    base = ({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
    error = assert_error(server.post(path, {"model": server.model_name, **base, **body}),
                         400, param)
    assert words in error["message"], error


@pytest.mark.parametrize("field, value", [
    ("structured_outputs", {"regex": "a", "whitespace_pattern": " "}),
    ("structured_outputs", {"json": {}, "structural_tag": "{}"}),
    ("guided_whitespace_pattern", " "),
])
def test_unsupported_constraint_options_are_named(server, field, value):
    response = server.post("/v1/completions", {"model": server.model_name, "prompt": "x",
                                               field: value})
    error = assert_error(response, 400, check_param=False, code="unsupported_parameter")
    assert error["param"].startswith(field), error

"""Tool-call parsers and the per-choice extraction: calls found in each format, text that is no
call kept as content, and streaming that gives the same calls and content as the whole text,
in OpenAI's delta shape, whatever the chunking."""

from __future__ import annotations

import json

import pytest

from server.api.tools.extract import NamedExtractor, ParserExtractor, RequiredExtractor
from server.api.tools.parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedCall,
    parser_for_template,
)
from server.assets import shipped_chat_template

WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')
TIME = ParsedCall("get_time", '{"zone": "CET"}')


@pytest.mark.parametrize("parser, text, content, calls", [
    (HermesParser(), 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris"}}\n</tool_call>', "Let me look.", [WEATHER]),
    (HermesParser(), '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
     '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}'
     '</tool_call>', "", [WEATHER, TIME]),
    (HermesParser(), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
     "", [WEATHER]),  # the output ended before the closing tag
    (HermesParser(), '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
     '</tool_call> and more text', "and more text", [WEATHER]),
    (HermesParser(), '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    (HermesParser(), "No tools needed.", "No tools needed.", []),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [WEATHER]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
     '; {"name": "get_time", "arguments": {"zone": "CET"}}', "", [WEATHER, TIME]),
    (Llama3JsonParser(), 'The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),
    (Llama3JsonParser(), '{"not": "a call"}', '{"not": "a call"}', []),
    (MistralParser(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"zone": "CET"}}]', "", [WEATHER, TIME]),
    (MistralParser(), 'Sure [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure", [WEATHER]),
    (MistralParser(), "[TOOL_CALLS][{broken", "[TOOL_CALLS][{broken", []),
])
def test_parse(parser, text, content, calls):
    assert parser.parse(text) == (content, calls)


def test_the_parser_comes_from_the_template_when_it_names_one_format():
    assert parser_for_template(shipped_chat_template("chatml-tools")) == "hermes"
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("<|python_tag|> or <tool_call>") is None  # ambiguous
    assert parser_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert parser_for_template(None) is None


def stream(extractor, text: str, size: int) -> tuple[str, list[dict]]:
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    content, deltas = "", []
    for i, piece in enumerate(pieces):
        got, calls = extractor.feed(piece, final=i == len(pieces) - 1)
        content += got
        deltas += [c.to_dict() for c in calls]
    return content, deltas


def merged(deltas: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) per call index, as a client assembles streamed deltas."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        entry = calls.setdefault(d["index"], ["", ""])
        if "id" in d:
            assert d["type"] == "function" and d["id"].startswith("call_")
            assert d["function"]["arguments"] == "" and entry == ["", ""]
            entry[0] = d["function"]["name"]
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
        entry[1] += d["function"]["arguments"]
    return [tuple(v) for _, v in sorted(calls.items())]  # type: ignore[misc]


HERMES_TEXT = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "CET"}}\n</tool_call>')


@pytest.mark.parametrize("size", [1, 3, 7, len(HERMES_TEXT)])
def test_streamed_calls_equal_the_whole_texts(size):
    content, deltas = stream(ParserExtractor(parser=HermesParser()), HERMES_TEXT, size)
    assert content.strip() == "Checking both." and "<" not in content
    assert merged(deltas) == [("get_weather", WEATHER.arguments), ("get_time", TIME.arguments)]


def test_content_never_leaks_half_a_marker():
    extractor = ParserExtractor(parser=HermesParser())
    assert extractor.feed("Hello <tool", final=False) == ("Hello ", [])
    assert extractor.feed("ing is fun", final=False) == ("<tooling is fun", [])
    assert extractor.feed("", final=True) == ("", [])


def test_one_call_when_parallel_calls_are_off():
    extractor = ParserExtractor(parser=HermesParser(), parallel=False)
    _, deltas = stream(extractor, HERMES_TEXT, 5)
    assert merged(deltas) == [("get_weather", WEATHER.arguments)]
    assert [c["function"]["name"] for c in extractor.calls] == ["get_weather"]


def test_a_malformed_call_is_content():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": '
    content, deltas = stream(ParserExtractor(parser=HermesParser()), text, 4)
    assert content == text and deltas == []


def test_named_streams_argument_fragments():
    extractor = NamedExtractor(name="get_weather")
    content, deltas = stream(extractor, '{"city": "Paris"}', 4)
    assert content == "" and merged(deltas) == [("get_weather", '{"city": "Paris"}')]
    assert extractor.calls[0]["function"] == {"name": "get_weather",
                                              "arguments": '{"city": "Paris"}'}


def test_required_reads_the_list_once_whole():
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}},
                       {"name": "get_time", "parameters": {"zone": "CET"}}])
    extractor = RequiredExtractor()
    content, deltas = stream(extractor, text, 6)
    assert content == ""
    assert merged(deltas) == [("get_weather", WEATHER.arguments), ("get_time", TIME.arguments)]
    cut = RequiredExtractor()
    assert stream(cut, text[:20], 6) == (text[:20], [])  # cut short: left as text
    assert cut.calls == []
    odd = RequiredExtractor()  # valid JSON of another shape (a stop string cut it so)
    assert stream(odd, '[{"name": 1}]', 6) == ('[{"name": 1}]', []) and odd.calls == []

"""One choice's tool calls, taken from its text as it is generated, in one of three modes:

- `auto`: a parser (parsers.py) finds calls in free text; content before them streams as it
  comes, less a tail that could still begin a call marker;
- a named function: the text is that function's arguments (the grammar makes it valid JSON
  for its schema), streamed as argument fragments;
- `required`: the text is a JSON list of `{"name", "parameters"}` (the grammar makes it one),
  read once whole.

`feed` returns the content to stream and the tool-call deltas in OpenAI's shape: a call's
first delta carries its index, id, type and name (arguments ""), later ones argument text."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.api.tools.parsers import ParsedCall, ToolParser


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    index: int
    arguments: str = ""
    id: str | None = None  # with the name, on a call's first delta
    name: str | None = None

    def to_dict(self) -> dict:
        function: dict = {"arguments": self.arguments}
        if self.name is None:
            return {"index": self.index, "function": function}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, **function}}


@dataclass
class ToolExtractor:
    """Calls found so far (for the whole response) and the deltas that announced them."""

    calls: list[dict] = field(default_factory=list)  # OpenAI tool_calls entries

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        raise NotImplementedError

    def _start(self, name: str, arguments: str) -> list[CallDelta]:
        index, new_id = len(self.calls), call_id()
        self.calls.append({"id": new_id, "type": "function",
                           "function": {"name": name, "arguments": arguments}})
        first = CallDelta(index, "", new_id, name)
        return [first, CallDelta(index, arguments)] if arguments else [first]


@dataclass
class ParserExtractor(ToolExtractor):
    parser: ToolParser | None = None
    parallel: bool = True
    _pending: str = ""  # text not yet sent as content, before the calls part
    _part: str | None = None  # the calls part, once it began
    _num_parsed: int = 0  # calls the parser found so far (sent, or dropped when not parallel)

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        assert self.parser is not None
        content = ""
        if self._part is None:
            self._pending += text
            start = self.parser.start(self._pending)
            if start is None:
                keep = 0 if final else self.parser.held_back(self._pending)
                cut = len(self._pending) - keep
                content, self._pending = self._pending[:cut], self._pending[cut:]
                return content, []
            content, self._part, self._pending = self._pending[:start], self._pending[start:], ""
        else:
            self._part += text
        calls, used = self.parser.calls(self._part, final)
        deltas: list[CallDelta] = []
        for call in calls[self._num_parsed:]:
            if self.parallel or not self.calls:
                deltas += self._start(call.name, call.arguments)
        self._num_parsed = len(calls)
        if final:  # text that is no call stays content
            content += self._part[used:]
        return content, deltas


@dataclass
class NamedExtractor(ToolExtractor):
    name: str = ""

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        if not self.calls:
            return "", self._start(self.name, text)
        self.calls[0]["function"]["arguments"] += text
        return "", [CallDelta(0, text)] if text else []


@dataclass
class RequiredExtractor(ToolExtractor):
    parallel: bool = True
    _text: str = ""

    def feed(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        self._text += text
        if not final:
            return "", []
        try:
            items = json.loads(self._text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str)
                and isinstance(i.get("parameters"), dict) for i in items):
            return self._text, []  # cut short (max_tokens, a stop string): left as text
        deltas: list[CallDelta] = []
        for item in items[:None if self.parallel else 1]:
            call = ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
            deltas += self._start(call.name, call.arguments)
        return "", deltas

"""Tool-call formats, each a parser of a model's whole output into (content, calls):

- `hermes` (Hermes, Qwen 2/2.5/3, ChatML models): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, one block per call;
- `llama3_json` (Llama 3.1+): the output is `{"name": ..., "parameters": {...}}` (optionally
  after `<|python_tag|>`), several separated by `;`;
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (or, with newer
  tokenizers, `name[ARGS]{...}` per call).

Text that does not parse as calls stays content: a model's malformed call is never dropped."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


def _call(obj: object, arguments_keys: tuple[str, ...] = ("arguments",)) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[k] for k in arguments_keys if k in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser:
    name: str = ""
    markers: tuple[str, ...] = ()  # text that starts the calls part of an output
    keeps_special_tokens = False  # its markers are special tokens: decode them

    def start(self, text: str) -> int | None:
        """Where the calls part of `text` (the output so far) begins, if it has begun."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could still begin a marker (not content yet)."""
        for size in range(min(len(text), max(map(len, self.markers))), 0, -1):
            tail = text[-size:]
            if any(m.startswith(tail) for m in self.markers):
                return size
        return 0

    def calls(self, part: str, final: bool) -> tuple[list[ParsedCall], int]:
        """The complete calls at the start of `part` (the output from the start of its calls
        part on), and how much of `part` they take; what follows them, once `final`, is
        content."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content, calls) of a whole output."""
        start = self.start(text)
        if start is None:
            return text, []
        calls, used = self.calls(text[start:], final=True)
        return (text[:start] + text[start + used:]).strip(), calls


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _OPEN = re.compile(r"\s*<tool_call>(.*)$", re.DOTALL)

    def calls(self, part: str, final: bool) -> tuple[list[ParsedCall], int]:
        calls: list[ParsedCall] = []
        used = 0
        while True:
            block = self._BLOCK.search(part, used)
            if block is None or part[used:block.start()].strip():
                # A last block the end of the output cut before its closing tag.
                unclosed = self._OPEN.match(part, used) if final else None
                if unclosed is not None and "<tool_call>" not in unclosed.group(1):
                    call = _parsed(unclosed.group(1))
                    if call is not None:
                        return calls + [call], len(part)
                return calls, used
            call = _parsed(block.group(1))
            if call is None:
                return calls, used
            calls.append(call)
            used = block.end()


def _parsed(text: str) -> ParsedCall | None:
    try:
        return _call(json.loads(text))
    except ValueError:
        return None


def _json_values(text: str, separator: str) -> list[object] | None:
    """The JSON values of `text`, one after another, with `separator` (or blanks) between."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == separator):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def start(self, text: str) -> int | None:
        # Only a whole output that is JSON (or the python tag) is a call.
        stripped = text.lstrip()
        if stripped.startswith(self.markers):
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or any(m.startswith(stripped) for m in self.markers):
            return len(text)
        return 0

    def calls(self, part: str, final: bool) -> tuple[list[ParsedCall], int]:
        if not final:
            return [], 0
        values = _json_values(part.removeprefix("<|python_tag|>"), ";")
        calls = [_call(v, ("parameters", "arguments")) for v in values or []]
        if not values or any(c is None for c in calls):
            return [], 0
        return [c for c in calls if c is not None], len(part)


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    keeps_special_tokens = True
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[ARGS\])?\s*")

    def calls(self, part: str, final: bool) -> tuple[list[ParsedCall], int]:
        if not final:
            return [], 0
        calls: list[ParsedCall] = []
        for piece in part.split("[TOOL_CALLS]")[1:]:
            if piece.lstrip().startswith("["):
                values = _json_values(piece, ",")
                items = values[0] if values and len(values) == 1 else None
                found = [_call(v) for v in items] if isinstance(items, list) else [None]
            else:  # name[ARGS]{...}
                named = self._NAMED.match(piece)
                values = _json_values(piece[named.end():], ",") if named else None
                found = ([_call({"name": named.group(1), "arguments": values[0]})]
                         if named and values and len(values) == 1 else [None])
            if not found or any(c is None for c in found):
                return [], 0
            calls += [c for c in found if c is not None]
        return calls, len(part)


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for_template(template: str | None) -> str | None:
    """The format a chat template teaches its model, when the template says so unambiguously."""
    if not template:
        return None
    found = [name for name, hint in (("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"),
                                     ("llama3_json", "<|python_tag|>"))
             if hint in template]
    return found[0] if len(found) == 1 else None

"""What a chat request's `tools` and `tool_choice` mean for its prompt, its output constraint
and the reading of its output:

- no tools, or `tool_choice: "none"`: a plain chat (the tools are not rendered);
- `auto` (the default with tools): the tools go into the prompt and the server's parser reads
  calls out of the text. Where xgrammar knows the parser's format (hermes, llama3_json), a
  structural tag holds every call the model starts to its function's schema;
- `required` or a named function: the output must be calls, enforced by a grammar. In the
  parser's own format where xgrammar knows it; otherwise, as vLLM does, a JSON list of
  `{"name", "parameters"}` (required) or the function's arguments alone (named)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from server.api.errors import bad_request
from server.api.protocol import ChatCompletionRequest, NamedToolChoice
from server.api.structured_outputs import canonical_json
from server.api.tools.extract import (
    NamedExtractor,
    ParserExtractor,
    RequiredExtractor,
    ToolExtractor,
)
from server.api.tools.parsers import PARSERS, ToolParser
from server.sampling_params import StructuredOutputsParams
from server.structured.grammar import MAX_JSON_WHITESPACE

# The xgrammar structural-tag format of each parser's tool-call syntax, where it has one.
_STRUCTURAL_TAGS = {"hermes": "qwen_3", "llama3_json": "llama"}
_NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    mode: str = "none"  # none | auto | named | required
    tools: list[dict] | None = None  # for the chat template
    constraint: StructuredOutputsParams | None = None
    parser: ToolParser | None = None
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def keeps_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.keeps_special_tokens

    def check(self) -> None:
        """What the plan cannot do, once the prompt rendered with its tools."""
        if self.mode == "auto" and self.parser is None:
            raise bad_request("tool_choice 'auto' needs a tool-call parser, and this server has "
                              "none for its model's chat template: start it with "
                              f"--tool-call-parser ({', '.join(PARSERS)})", param="tools")

    def extractor(self) -> ToolExtractor | None:
        if self.mode == "none":
            return None
        if self.parser is not None:  # auto, or forced in the parser's own format
            return ParserExtractor(parser=self.parser, parallel=self.parallel)
        if self.mode == "named":
            return NamedExtractor(name=self.name or "")
        return RequiredExtractor(parallel=self.parallel)


def _schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters is not None else _NO_ARGUMENTS


def plan_tools(body: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    """`parser_name`: the server's tool-call parser (None: it has none)."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    defs = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": _schema(t.function.parameters)}} for t in tools]
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", param="tools")
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise bad_request(f"tool_choice names '{named}', which is not one of the tools",
                          param="tool_choice")
    mode = "named" if named is not None else (choice or "auto")
    parser = PARSERS[parser_name]() if parser_name is not None else None
    tag_format = _STRUCTURAL_TAGS.get(parser_name or "")
    if tag_format is not None:
        tag = xgr.get_builtin_structural_tag(
            tag_format, tools=defs,
            tool_choice=choice.model_dump() if named is not None else mode,
            reasoning="disabled", max_whitespace_cnt=MAX_JSON_WHITESPACE,
            parallel_tool_calls=body.parallel_tool_calls)
        return ToolPlan(mode, defs, StructuredOutputsParams(structural_tag=tag.model_dump_json()),
                        parser, named, body.parallel_tool_calls)
    if mode == "auto":
        if parser is None:  # checked after rendering (`check`): a template without tools says more
            return ToolPlan(mode, defs, parallel=body.parallel_tool_calls)
        if any(t.function.strict for t in tools):
            raise bad_request(f"strict tools with tool_choice 'auto' are enforced only in the "
                              f"hermes and llama3_json formats, not {parser.name}",
                              param="tools", code="unsupported_parameter")
        return ToolPlan(mode, defs, None, parser, None, body.parallel_tool_calls)
    if mode == "named":
        schema = _schema(tools[names.index(named)].function.parameters)
        return ToolPlan(mode, defs, StructuredOutputsParams(json=canonical_json(schema)),
                        None, named, body.parallel_tool_calls)
    items = {"anyOf": [{"type": "object", "properties": {
        "name": {"enum": [d["function"]["name"]]}, "parameters": d["function"]["parameters"]},
        "required": ["name", "parameters"], "additionalProperties": False} for d in defs]}
    schema = {"type": "array", "items": items, "minItems": 1,
              **({} if body.parallel_tool_calls else {"maxItems": 1})}
    return ToolPlan(mode, defs, StructuredOutputsParams(json=canonical_json(schema)), None, None,
                    body.parallel_tool_calls)

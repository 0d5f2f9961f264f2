"""A constraint (StructuredOutputsParams) as an xgrammar Grammar. Building one needs no
tokenizer and checks the constraint whole (an unsupported schema keyword, a bad regex, an EBNF
rule that does not exist), so the API builds one to answer 400 before a request is queued."""

from __future__ import annotations

import json
import re

import xgrammar as xgr

from server.sampling_params import StructuredOutputsParams

# Whitespace characters JSON may have in one place: a newline and indentation, yet no endless
# run of blanks from a model that has not learned where JSON ends.
MAX_JSON_WHITESPACE = 16
_ANY_OBJECT = '{"type": "object"}'

# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as this class, which
# lets raw control characters through (JSON forbids U+0000-U+001F unescaped in strings); its other
# string rules exclude them, as the replacement does.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_STRICT_STRING_CHAR = r'[^\0-\x1f\"\\]'

# xgrammar's messages start with a timestamp and its C++ source location.
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _message(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _LOCATION.sub("", text)


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """A grammar whose only sentences are the given strings (EBNF literals escape as JSON)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _strict_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    """The grammar with no raw control character allowed in any JSON string."""
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR))


def build_grammar(spec: StructuredOutputsParams) -> xgr.Grammar:
    """Raises ValueError naming what is wrong with the constraint."""
    try:
        if spec.json is not None or spec.json_object:
            return _strict_strings(xgr.Grammar.from_json_schema(
                spec.json or _ANY_OBJECT, any_whitespace=spec.any_whitespace, strict_mode=True,
                max_whitespace_cnt=MAX_JSON_WHITESPACE if spec.any_whitespace else None))
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice is not None:
            return xgr.Grammar.from_ebnf(choice_ebnf(spec.choice))
        if spec.structural_tag is not None:
            return _strict_strings(xgr.Grammar.from_structural_tag(spec.structural_tag))
        assert spec.grammar is not None  # StructuredOutputsParams holds exactly one
        if "::=" in spec.grammar:
            return xgr.Grammar.from_ebnf(spec.grammar)
        return xgr.Grammar.from_lark(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(_message(e)) from None

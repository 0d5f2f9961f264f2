"""A request's structured-outputs fields (OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` names) as the engine's one constraint. The
constraint is built whole here, so a bad schema, regex or grammar is a 400 naming its field
before anything is queued."""

from __future__ import annotations

import json
from typing import Any

from server.api.errors import bad_request
from server.api.protocol import (
    STRUCTURED_OUTPUTS_UNSUPPORTED,
    JsonSchema,
    StructuredOutputsBody,
    _SamplingFields,
    unsupported_field,
)
from server.sampling_params import StructuredOutputsParams as Spec
from server.structured.grammar import build_grammar


def canonical_json(value: Any) -> str:
    """JSON text that is the same however the client ordered or spaced it: one cache key."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _schema_text(value: JsonSchema, param: str) -> str:
    """The schema as canonical JSON text: one cache entry however the client spelled it."""
    schema: Any = value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise bad_request(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema object", param=param)
    return canonical_json(schema)


def _from_vllm(body: StructuredOutputsBody) -> tuple[str, Spec]:
    name = unsupported_field(body, STRUCTURED_OUTPUTS_UNSUPPORTED)
    if name is not None:
        raise bad_request(f"'structured_outputs.{name}' is not supported yet",
                          param=f"structured_outputs.{name}", code="unsupported_parameter")
    given = [key for key, value in (("json", body.json_), ("regex", body.regex),
                                    ("choice", body.choice), ("grammar", body.grammar),
                                    ("json_object", body.json_object or None))
             if value is not None]
    if len(given) != 1:
        raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar "
                          f"and json_object, got {', '.join(given) or 'none'}",
                          param="structured_outputs")
    param = f"structured_outputs.{given[0]}"
    whitespace = not body.disable_any_whitespace
    if body.json_ is not None:
        return param, Spec(json=_schema_text(body.json_, param), any_whitespace=whitespace)
    if body.json_object:
        return param, Spec(json_object=True, any_whitespace=whitespace)
    return param, Spec(regex=body.regex, grammar=body.grammar,
                       choice=tuple(body.choice) if body.choice is not None else None)


def _constraints(body: _SamplingFields) -> list[tuple[str, Spec]]:
    found: list[tuple[str, Spec]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", Spec(json_object=True)))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise bad_request("response_format of type json_schema needs its json_schema",
                              param="response_format.json_schema")
        schema = response_format.json_schema.schema_
        param = "response_format.json_schema.schema"
        found.append((param, Spec(json=_schema_text(schema, param)) if schema is not None
                      else Spec(json_object=True)))
    if body.structured_outputs is not None:
        found.append(_from_vllm(body.structured_outputs))
    if body.guided_json is not None:
        found.append(("guided_json", Spec(json=_schema_text(body.guided_json, "guided_json"))))
    if body.guided_regex is not None:
        found.append(("guided_regex", Spec(regex=body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", Spec(choice=tuple(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", Spec(grammar=body.guided_grammar)))
    return found


def constraint_for(body: _SamplingFields,
                   extra: tuple[str, Spec] | None = None) -> Spec | None:
    """The request's one output constraint, checked; None when it has none. `extra` is one
    the request implies (its tool_choice), named by its field."""
    found = _constraints(body) + ([extra] if extra is not None else [])
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"a request takes one structured-outputs constraint, got "
                          f"{found[0][0]} and {found[1][0]}", param=found[1][0])
    param, spec = found[0]
    try:
        build_grammar(spec)
    except ValueError as e:
        raise bad_request(f"invalid {param}: {e}", param=param) from None
    return spec

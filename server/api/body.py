"""Reading a request body: a JSON media type, the size limit (declared and actual), and pydantic's
strict JSON validation, every failure an OpenAI-style 4xx naming the field where one is to blame."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from server.api.errors import APIError, bad_request, from_validation_error


def is_json_media_type(content_type: str | None) -> bool:
    """application/json or a +json type; no Content-Type at all is taken as JSON (as FastAPI
    does, for `curl --data-binary` and the like)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def _holds_non_text(value: Any) -> bool:
    """Whether a string inside `value` is not Unicode text (a lone surrogate). Iterative: a
    body may nest as deep as Python's parser allows."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def field_with_non_text(raw: bytes) -> str | None:
    """The top-level field of a body that is JSON but for an escape like "\\ud800" (a lone
    UTF-16 surrogate, which pydantic's parser rejects and Python's accepts)."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return next((key for key, value in parsed.items() if _holds_non_text(value)), None)


async def read_body(request: Request, model: type[BaseModel], limit: int) -> BaseModel:
    if not is_json_media_type(request.headers.get("content-type")):
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), "
                       f"got Content-Type: {request.headers['content-type']}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = field_with_non_text(raw) if first.get("type") == "json_invalid" else None
        if field is not None:
            raise bad_request(f"invalid value for '{field}': a string holds a lone UTF-16 "
                              f"surrogate escape, which is not Unicode text",
                              param=field) from None
        raise from_validation_error(e) from None

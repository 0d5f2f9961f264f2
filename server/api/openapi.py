"""The OpenAPI document's request bodies. The routes read their bodies themselves (size limit,
strict JSON, the OpenAI error envelope), so FastAPI cannot see their models: each route names
its model here and the document gets the model's JSON schema, which clients, code generators and
the schema fuzzer (tests/reliability) read."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}},
        "x-body-model": model}


def install_openapi(app: FastAPI) -> None:
    """Build the document once, with every body model (and the models inside it) among the
    components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        models: list[type[BaseModel]] = []
        for route in app.routes:
            extra = getattr(route, "openapi_extra", None) or {}
            if "x-body-model" in extra:
                models.append(extra.pop("x-body-model"))
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template=_REF)
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]

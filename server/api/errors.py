"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, for every error."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.protocol import EngineDeadError, RequestFailedError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(error: ValidationError) -> APIError:
    """The first problem pydantic found, naming the top-level field as OpenAI's `param`."""
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}")
    if kind == "model_type" and not loc:
        return bad_request("the request body must be a JSON object")
    if kind == "missing":
        return bad_request(f"'{loc[0]}' is a required field", param=loc[0] if loc else None)
    param = loc[0] if loc else None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"invalid value for '{'.'.join(loc)}': {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return bad_request(f"invalid request: {first.get('msg', 'invalid value')}",
                           param=loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return APIError(status, message, param=None, code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        return APIError(500, str(exc), type="server_error").response()  # what the engine said

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return APIError(503, str(exc), type="service_unavailable_error").response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal server error: {type(exc).__name__}",
                        type="server_error").response()

"""The FastAPI application: routes, middleware (API key, request id, body limit, CORS),
lifespan (the engine thread), health and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api.body import read_body
from server.api.errors import APIError, install_error_handlers
from server.api.metrics import Metrics
from server.api.openapi import install_openapi, json_body
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from server.api.serving_chat import create_chat_completion, render_chat
from server.api.serving_common import ServingContext, check_supported
from server.api.serving_completion import create_completion
from server.api.serving_responses import create_response
from server.config import EngineConfig, ServerConfig
from server.engine.protocol import EngineClient
from server.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

_PUBLIC_PATHS = frozenset({"/health"})  # never behind the API key (liveness probes)


class RequestIdAndAuth:
    """X-Request-Id on every response (the client's, or a fresh one) and the API key check of the
    protected paths, as plain ASGI: `@app.middleware("http")` (BaseHTTPMiddleware) would relay
    every streamed chunk through an extra task and memory stream."""

    def __init__(self, app: ASGIApp, api_key: str | None, public_metrics: bool = False) -> None:
        self.app = app
        self.api_key = api_key
        self.public = _PUBLIC_PATHS | ({"/metrics"} if public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        if (self.api_key and scope["method"] != "OPTIONS"
                and scope["path"] not in self.public):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                response = APIError(401, "invalid or missing API key (send it as "
                                    "'Authorization: Bearer <key>')",
                                    type="authentication_error",
                                    code="invalid_api_key").response()
                await response(scope, receive, send_with_id)
                return
        await self.app(scope, receive, send_with_id)


def served_name(engine_config: EngineConfig, server_config: ServerConfig) -> str:
    return server_config.served_model_name or Path(engine_config.model.model).name


def build_app(engine_config: EngineConfig, server_config: ServerConfig,
              engine: EngineClient | None = None) -> FastAPI:
    """The app over `engine` (by default the real one, per `server_config.engine_mode`)."""
    name = served_name(engine_config, server_config)
    metrics = Metrics(name)
    if engine is None:
        from server.engine.async_client import make_engine_client

        engine = make_engine_client(engine_config, server_config.engine_mode)
    ctx = ServingContext(engine, name, server_config.max_queued_requests, metrics,
                         chat_template=server_config.chat_template,
                         tool_call_parser=server_config.tool_call_parser)
    created = int(time.time())
    limit = server_config.max_request_body_bytes
    tokenizer_error: list[BaseException] = []

    async def load_api_tokenizer() -> None:
        # After the engine's model: loading both at once on few cores made start-up slower
        # (their imports contend for the GIL and the import locks; docs/performance.md).
        while engine.model_info is None and engine.error is None:
            await asyncio.sleep(0.02)
        if engine.error is not None:
            return
        try:
            ctx.tokenizer = await asyncio.to_thread(load_tokenizer, engine.model_info.model_dir)
        except Exception as e:  # reported through /health
            logger.error("tokenizer load failed: %s", e)
            tokenizer_error.append(e)

    def failure() -> str | None:
        if engine.error is not None:
            return (f"the engine died: {engine.error}" if engine.model_info is not None
                    else f"the engine failed to start: {engine.error}")
        return f"the tokenizer failed to load: {tokenizer_error[0]}" if tokenizer_error else None

    async def watch_engine() -> None:
        """A failed start or a dead engine never recovers: tell whoever serves the app
        (server/cli.py stops and exits non-zero, so a supervisor restarts it)."""
        while failure() is None:
            await asyncio.sleep(0.05)
        app.state.engine_failure = failure()
        logger.error("%s; shutting down", app.state.engine_failure)
        on_failure = getattr(app.state, "on_engine_failure", None)
        if on_failure is not None:
            on_failure()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start(asyncio.get_running_loop(), metrics.on_step)
        tasks = [asyncio.create_task(load_api_tokenizer()), asyncio.create_task(watch_engine())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.engine_failure = None  # why the engine is gone for good, once it is
    install_error_handlers(app)
    install_openapi(app)
    if server_config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])

    app.add_middleware(RequestIdAndAuth, api_key=server_config.api_key,
                       public_metrics=server_config.public_metrics)

    @app.get("/health")
    async def health() -> Response:
        problem = failure()
        if problem is None and ctx.ready:
            return Response(status_code=200)
        return APIError(503, problem or "the engine is loading",
                        type="service_unavailable_error").response()

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "pagedserve",
                "root": engine_config.model.model, "parent": None}
        if engine.model_info is not None:
            card["max_model_len"] = engine.model_info.max_model_len
        return card

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return model_card()

    if server_config.debug_endpoints:
        @app.get("/debug/engine")
        async def debug_engine() -> dict:
            ctx.check_ready()
            return dataclasses.asdict(await engine.check())

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest, limit)
        return await create_completion(ctx, body, request)  # type: ignore[arg-type]

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await read_body(request, ChatCompletionRequest, limit)
        return await create_chat_completion(ctx, body, request)  # type: ignore[arg-type]

    @app.post("/v1/responses", openapi_extra=json_body(ResponsesRequest))
    async def responses(request: Request):
        body = await read_body(request, ResponsesRequest, limit)
        return await create_response(ctx, body, request)  # type: ignore[arg-type]

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request) -> JSONResponse:
        body: TokenizeRequest = await read_body(request, TokenizeRequest, limit)  # type: ignore
        ctx.check_ready()
        ctx.check_model(body)  # type: ignore[arg-type]
        check_supported(body, body.messages)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
            tokens = render_chat(ctx, body.messages, body.add_generation_prompt, tools)
        else:
            tokens = list(ctx.tokenizer(body.prompt,
                                        add_special_tokens=body.add_special_tokens).input_ids)
        return JSONResponse({"count": len(tokens), "max_model_len": ctx.model.max_model_len,
                             "tokens": tokens})

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(request: Request) -> JSONResponse:
        body: DetokenizeRequest = await read_body(request, DetokenizeRequest, limit)  # type: ignore
        ctx.check_ready()
        ctx.check_model(body)  # type: ignore[arg-type]
        ctx.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": ctx.tokenizer.decode(body.tokens)})

    return app

"""The real engine over the bundled model, served in a thread of the test process with the debug
endpoint on (GET /debug/engine: the KV pool's invariant check), a chat template, and a short
context so that no generated request runs long."""

from __future__ import annotations

import pytest

from server.api.app import build_app
from server.assets import BUNDLED_MODEL_DIR
from server.config import EngineConfig, ServerConfig
from tests.api.conftest import CHAT_TEMPLATE
from tests.thread_server import ThreadServer

MODEL_NAME = "stories"
MAX_MODEL_LEN = 96


def serve_bundled_model(**server_settings) -> ThreadServer:
    engine_config = EngineConfig.from_kwargs(str(BUNDLED_MODEL_DIR), max_model_len=MAX_MODEL_LEN,
                                             kv_cache_memory=32 << 20)
    settings = {"chat_template": CHAT_TEMPLATE, "debug_endpoints": True,
                "served_model_name": MODEL_NAME, **server_settings}
    app = build_app(engine_config, ServerConfig(**settings))
    return ThreadServer(app, "engine_server", MODEL_NAME, settings.get("api_key")).start(120)


@pytest.fixture(scope="module")
def engine_server():
    server = serve_bundled_model()
    yield server
    server.stop()

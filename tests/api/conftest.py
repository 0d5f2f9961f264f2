"""The app over the fake engine (server/engine/fake.py), served by uvicorn in a thread of the test
process: requests last exactly as long as a test lets the fake's steps run.

`fake_server` is per test (a fresh fake core each time); `make_fake_server(**kwargs)` builds
one with other fake-core or server settings."""

from __future__ import annotations

import threading

import pytest
import uvicorn

from server.api.app import build_app
from server.config import EngineConfig, ServerConfig
from server.engine.fake import FakeEngineClient, FakeEngineCore
from tests.http_client import ServerClient, free_port, wait_healthy

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
MODEL_NAME = "fake-model"


class FakeServer(ServerClient):
    def __init__(self, core: FakeEngineCore, **server_settings) -> None:
        self.core = core
        self.engine = FakeEngineClient(core)
        self.port = free_port()
        self.model_name = server_settings.pop("served_model_name", MODEL_NAME)
        self.api_key = server_settings.get("api_key")
        self.name = "fake_server"
        settings = {"chat_template": CHAT_TEMPLATE, **server_settings}
        config = ServerConfig(port=self.port, served_model_name=self.model_name, **settings)
        self.app = build_app(EngineConfig.from_kwargs(), config, engine=self.engine)
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                      log_level="warning"))
        self._thread = threading.Thread(target=self._uvicorn.run, name="uvicorn", daemon=True)

    def start(self) -> FakeServer:
        self._thread.start()
        wait_healthy(self.base_url)
        return self

    def stop(self) -> None:
        self.core.resume()
        self._uvicorn.should_exit = True
        self._thread.join(30)

    def wait_engine(self, predicate, timeout: float = 30.0) -> None:
        self.core.wait_for(predicate, timeout)


@pytest.fixture()
def make_fake_server():
    started: list[FakeServer] = []

    def make(core: FakeEngineCore | None = None, **server_settings) -> FakeServer:
        server = FakeServer(core or FakeEngineCore(), **server_settings)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture()
def fake_server(make_fake_server) -> FakeServer:
    return make_fake_server()

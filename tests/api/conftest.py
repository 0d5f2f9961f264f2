"""The app over the fake engine (server/engine/fake.py), served by uvicorn in a thread of the test
process: requests last exactly as long as a test lets the fake's steps run.

`fake_server` is per test (a fresh fake core each time); `make_fake_server(**kwargs)` builds
one with other fake-core or server settings."""

from __future__ import annotations

import pytest

from server.api.app import build_app
from server.config import EngineConfig, ServerConfig
from server.engine.fake import FakeEngineClient, FakeEngineCore
from tests.http_client import free_port
from tests.thread_server import ThreadServer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
MODEL_NAME = "fake-model"


class FakeServer(ThreadServer):
    def __init__(self, core: FakeEngineCore, **server_settings) -> None:
        self.core = core
        self.engine = FakeEngineClient(core)
        port = free_port()
        model_name = server_settings.pop("served_model_name", MODEL_NAME)
        settings = {"chat_template": CHAT_TEMPLATE, **server_settings}
        config = ServerConfig(port=port, served_model_name=model_name, **settings)
        app = build_app(EngineConfig.from_kwargs(), config, engine=self.engine)
        super().__init__(app, "fake_server", model_name, server_settings.get("api_key"), port)

    def stop(self) -> None:
        self.core.resume()
        super().stop()

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


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from server.assets import BUNDLED_MODEL_DIR
    from server.engine.tokenizer import load_tokenizer

    return load_tokenizer(BUNDLED_MODEL_DIR)


@pytest.fixture()
def scripted(make_fake_server, bundled_tokenizer):
    """`scripted(text, **server_settings)`: a server over a fake engine that answers every
    request with `text`, then EOS (token 2), served with the shipped tool template unless the
    settings name another."""
    from server.assets import shipped_chat_template

    def make(text: str, **settings) -> FakeServer:
        ids = bundled_tokenizer(text, add_special_tokens=False).input_ids + [2]
        core = FakeEngineCore(max_model_len=4096, eos_token_ids=[2],
                              token_fn=lambda _, i: ids[min(i, len(ids) - 1)])
        settings.setdefault("chat_template", shipped_chat_template("chatml-tools"))
        return make_fake_server(core, **settings)

    return make

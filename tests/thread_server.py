"""An app served by uvicorn in a thread of the test process: the fake engine's server
(tests/api) and the real engine's (tests/reliability). Tests reach the engine object directly."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI

from tests.http_client import ServerClient, free_port, wait_healthy


class ThreadServer(ServerClient):
    def __init__(self, app: FastAPI, name: str, model_name: str,
                 api_key: str | None = None, port: int | None = None) -> None:
        self.app, self.name, self.model_name, self.api_key = app, name, model_name, api_key
        self.port = port or free_port()
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                      log_level="warning"))
        self._thread = threading.Thread(target=self._uvicorn.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 60.0):
        self._thread.start()
        wait_healthy(self.base_url, timeout)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(30)

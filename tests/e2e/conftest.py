"""End-to-end fixtures: the real `python -m server serve` in a subprocess on a free loopback port.

Servers are session scoped (each start costs a few seconds) and shared by the test modules:

- `server`: a copy of the bundled stories260k with a chat template added, served under the
  copy's directory name (`CHAT_MODEL_NAME`), the default limits;
- `auth_server`: the bundled model (no MODEL_DIR argument, so no chat template and the default
  name "stories260k") behind `--api-key`;
- `limits_server`: the chat copy under `--served-model-name`, with the API key from the
  `PAGEDSERVE_API_KEY` environment variable, one running sequence, a waiting queue of one and a
  4 KiB request-body limit.

Helpers the tests need live on the `Server` object (a fixture value), since this directory only
holds conftest.py and test modules. A failing test gets the tail of the logs of the servers it
used attached to its report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.assets import BUNDLED_MODEL_DIR
from tests.http_client import NotHealthy, ServerClient, free_port, wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[2]
KV_CACHE_BYTES = "50000000"
STARTUP_TIMEOUT_S = 90.0

CHAT_MODEL_NAME = "tiny-stories-chat"
LIMITS_MODEL_NAME = "limited-storyteller"
API_KEY = "sk-e2e-flag-key"
ENV_API_KEY = "sk-e2e-env-key"
MAX_BODY_BYTES = 4096
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")



class ServerError(RuntimeError):
    pass


class Server(ServerClient):
    """One `python -m server serve` subprocess and what the tests do with it."""

    def __init__(self, name: str, args: list[str], log_path: Path,
                 env: dict[str, str] | None = None, model_name: str = "",
                 api_key: str | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.model_name = model_name
        self.api_key = api_key
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.health_statuses: list[int] = []  # what /health answered while starting

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Server:
        cmd = [sys.executable, "-m", "server", "serve", *self.args, "--port", str(self.port),
               "--kv-cache-memory", KV_CACHE_BYTES, "--log-level", "info"]
        env = dict(os.environ)
        env.pop("PAGEDSERVE_API_KEY", None)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        try:
            self.health_statuses = wait_healthy(self.base_url, STARTUP_TIMEOUT_S, self.proc)
        except NotHealthy as e:
            self.stop()
            raise ServerError(f"server {self.name}: {e}:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        return self.proc.returncode if self.proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

# ---------------------------------------------------------------------- fixtures
_STARTED: dict[str, Server] = {}


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def chat_model_dir(e2e_dir: Path) -> Path:
    """A copy of the bundled model with a chat template; its directory name is the served
    name by default."""
    out = e2e_dir / CHAT_MODEL_NAME
    shutil.copytree(BUNDLED_MODEL_DIR, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return out


def _start(name: str, e2e_dir: Path, args: list[str], **kwargs: Any) -> Server:
    server = Server(name, args, e2e_dir / f"{name}.log", **kwargs)
    _STARTED[name] = server
    return server.start()


@pytest.fixture(scope="session")
def server(e2e_dir: Path, chat_model_dir: Path):
    s = _start("server", e2e_dir, [str(chat_model_dir)], model_name=CHAT_MODEL_NAME)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def auth_server(e2e_dir: Path):
    s = _start("auth_server", e2e_dir, ["--api-key", API_KEY], model_name="stories260k",
               api_key=API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def limits_server(e2e_dir: Path, chat_model_dir: Path):
    s = _start("limits_server", e2e_dir,
               [str(chat_model_dir), "--served-model-name", LIMITS_MODEL_NAME,
                "--max-num-seqs", "1", "--max-queued-requests", "1",
                "--max-request-body-bytes", str(MAX_BODY_BYTES)],
               env={"PAGEDSERVE_API_KEY": ENV_API_KEY}, model_name=LIMITS_MODEL_NAME,
               api_key=ENV_API_KEY)
    yield s
    s.stop()


@pytest.fixture()
def fresh_server(e2e_dir: Path, chat_model_dir: Path, request):
    """A server of the test's own (for SIGTERM), stopped at the end of the test."""
    name = f"fresh_{request.node.name}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    s = _start(name, e2e_dir, [str(chat_model_dir)], model_name=CHAT_MODEL_NAME)
    yield s
    s.stop()


@pytest.fixture()
def oai(server: Server):
    client = server.openai()
    yield client
    client.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for name in ("server", "auth_server", "limits_server"):
            if name in getattr(item, "fixturenames", ()) and name in _STARTED:
                report.sections.append((f"{name} log (tail)", _STARTED[name].log_tail(120)))
        for name, s in _STARTED.items():
            if name.startswith("fresh_") and name.endswith(re.sub(r"[^A-Za-z0-9_.-]", "_",
                                                                  item.name)):
                report.sections.append((f"{name} log (tail)", s.log_tail(120)))
    return report

from __future__ import annotations

import os
import sys
from pathlib import Path

# Make `tests.model_factory` importable without installing the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Which GEMM serves a row count is measured at start-up (packed_gemm.gemm_table): the tests
# fix it, so the kernels they exercise do not depend on how fast this machine is. Servers the
# tests start inherit it. test_cpu_speedups.py tests the measurement with its own timings.
os.environ.setdefault("PAGEDSERVE_SMALL_GEMM_ROWS", "64")

import pytest  # noqa: E402

from tests import real_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a model directory (tests/real_model.py); skips the test with
    the reason when the package is not installed."""
    reason = real_model.missing()
    if reason is not None:
        pytest.skip(reason)
    return real_model.build_model_dir()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir):
    """The real instruct model served in a thread of the test process, as SERVED_NAME."""
    from server.api.app import build_app
    from server.config import EngineConfig, ServerConfig
    from tests.thread_server import ThreadServer

    config = EngineConfig.from_kwargs(str(smollm2_dir), max_model_len=real_model.MAX_MODEL_LEN,
                                      kv_cache_memory=256 << 20)
    name = real_model.SERVED_NAME
    server = ThreadServer(build_app(config, ServerConfig(served_model_name=name)), name,
                          name).start(180)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_tools_server(smollm2_dir):
    """The real instruct model with the shipped tool template (chatml-tools: its own template
    has no tools), so the hermes tool-call parser is chosen from it."""
    from server.api.app import build_app
    from server.assets import shipped_chat_template
    from server.config import EngineConfig, ServerConfig
    from tests.thread_server import ThreadServer

    config = EngineConfig.from_kwargs(str(smollm2_dir), max_model_len=real_model.MAX_MODEL_LEN,
                                      kv_cache_memory=256 << 20)
    name = real_model.SERVED_NAME
    settings = ServerConfig(served_model_name=name,
                            chat_template=shipped_chat_template("chatml-tools"))
    server = ThreadServer(build_app(config, settings), f"{name}-tools", name).start(180)
    yield server
    server.stop()

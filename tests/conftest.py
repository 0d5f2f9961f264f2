from __future__ import annotations

import sys
from pathlib import Path

# Make `tests.model_factory` importable without installing the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

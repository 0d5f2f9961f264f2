"""Package data: the bundled demo model (stories260k, MIT; see stories260k/NOTICE)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "stories260k"

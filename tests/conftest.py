from __future__ import annotations

import sys
from pathlib import Path

# Make `tests.model_factory` importable without installing the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

"""Package data: the bundled demo model (stories260k, MIT; see stories260k/NOTICE), chat
templates a model may lack (chat_templates/, by name), and the text `bench perplexity` scores
by default (perplexity.txt, written for this project)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "stories260k"
CHAT_TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"
PERPLEXITY_TEXT = Path(__file__).resolve().parent / "perplexity.txt"


def shipped_chat_template(name: str) -> str | None:
    """The Jinja text of the chat template shipped under `name`, if there is one."""
    path = CHAT_TEMPLATES_DIR / f"{name}.jinja"
    return path.read_text() if name.replace("-", "").isalnum() and path.is_file() else None

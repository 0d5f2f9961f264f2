"""Tokenizer loading (transformers' AutoTokenizer, from the local model directory only)."""

from __future__ import annotations

from pathlib import Path

from server.models.errors import ModelLoadError


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {e}") from None

"""Tokenizer loading (transformers' AutoTokenizer, from the local model directory only; for a
GGUF file, its GGUF tokenizer conversion of the file's metadata, which keeps the file's ids and
chat template)."""

from __future__ import annotations

from pathlib import Path

from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    gguf_file = find_gguf(model_dir)
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 local_files_only=True)
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {e}") from None

"""Tokenizer loading (transformers' AutoTokenizer, from the local model directory only; for a
GGUF file, its GGUF tokenizer conversion of the file's metadata, which keeps the file's ids and
chat template)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from server.models.errors import ModelLoadError
from server.models.gguf import file_version, find_gguf


def load_tokenizer(model_dir: Path):
    """A tokenizer of the caller's own (callers in other threads never share one)."""
    from transformers import AutoTokenizer

    gguf_file = find_gguf(model_dir)
    try:
        if gguf_file is not None:
            return copy.deepcopy(_converted(*file_version(gguf_file)))
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {e}") from None


@functools.lru_cache(maxsize=2)
def _converted(path: str, mtime_ns: int, size: int):
    """A GGUF file's converted tokenizer, once per file version: the conversion takes seconds
    for a 49k vocabulary (the LLM, the API and the grammar cache each load one); a copy, 0.1 s."""
    from transformers import AutoTokenizer

    file = Path(path)
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name,
                                         local_files_only=True)

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.model_factory import ARCH_VARIANTS, hf_greedy, make_tiny_model

ARCHS = sorted(ARCH_VARIANTS)
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


def random_prompts(seed: int, count: int, min_len: int, max_len: int,
                   prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 512) for _ in range(rng.randrange(min_len, max_len))]
            for _ in range(count)]


class Reference:
    """transformers' greedy continuations, computed once per (model, prompt)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    def __call__(self, model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (str(model_dir), tuple(prompt), max_new_tokens)
        if key not in self._cache:
            self._cache[key] = hf_greedy(model_dir, prompt, max_new_tokens)
        return self._cache[key]


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()

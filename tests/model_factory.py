"""Tiny random-weight Hugging Face model directories for tests (nothing is downloaded), and
transformers' own greedy continuation to compare against.

The models are `pagedserve bench make-model`'s `test-*` presets (server/bench/make_model.py, the
one maker): the tokenizer is the bundled stories260k one (512 ids), copied next to the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.bench.make_model import PRESETS, make_model

# Architecture name -> its make-model preset (llama, qwen2, qwen3, mistral).
ARCH_VARIANTS = {name.removeprefix("test-"): name for name in PRESETS if name.startswith("test-")}


def make_tiny_model(out_dir: Path, arch: str, seed: int = 0, dtype: str = "float32",
                    **overrides) -> Path:
    """The `test-<arch>` preset written to out_dir; `overrides` are config keyword arguments."""
    make_model(ARCH_VARIANTS[arch], out_dir, seed=seed, dtype=dtype, **overrides)
    return out_dir


def hf_greedy(model_dir: Path, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers itself, one prompt at a time, no stopping."""
    return hf_greedy_logits(model_dir, prompt_token_ids, max_new_tokens)[0]


def hf_greedy_logits(model_dir: Path, prompt_token_ids: list[int], max_new_tokens: int,
                     dtype: torch.dtype = torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    """hf_greedy with the model in `dtype`, and the last position's logits of every step."""
    model = _hf_model(model_dir, dtype)
    ids, logits = list(prompt_token_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits.append(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt_token_ids):], logits


_HF_CACHE: dict[tuple[str, torch.dtype], object] = {}


def _hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    import transformers

    key = (str(model_dir), dtype)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype).eval()
    return _HF_CACHE[key]

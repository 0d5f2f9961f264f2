"""Tiny random-weight Hugging Face model directories for tests (nothing is downloaded).

The tokenizer is the bundled stories260k one (512 ids), copied next to the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from server.assets import BUNDLED_MODEL_DIR

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, initializer_range=0.2)

ARCH_VARIANTS = {
    # Llama: llama3 rope scaling, untied head, MQA-ish GQA 4:1.
    "llama": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
    # Qwen2: qkv bias, tied embeddings.
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # Qwen3: q/k RMSNorm, head_dim != hidden / heads.
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    # Mistral: a sliding window shorter than the test sequences.
    "mistral": ("MistralConfig", dict(sliding_window=12, tie_word_embeddings=False)),
}


def make_tiny_model(out_dir: Path, arch: str, seed: int = 0, dtype: str = "float32",
                    **overrides) -> Path:
    import transformers

    config_cls_name, extra = ARCH_VARIANTS[arch]
    config = getattr(transformers, config_cls_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if arch == "qwen2":
        with torch.no_grad():  # make the biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model = model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL_DIR / name, out_dir / name)
    return out_dir


def hf_greedy(model_dir: Path, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers itself, one prompt at a time, no stopping."""
    model = _hf_model(model_dir)
    ids = list(prompt_token_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_token_ids):]


_HF_CACHE: dict[str, object] = {}


def _hf_model(model_dir: Path):
    import transformers

    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    return _HF_CACHE[key]

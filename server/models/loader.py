"""Load a Hugging Face model directory (config, generation config, safetensors weights; GPTQ and
AWQ layers through models/packed_int.py) or a GGUF file (models/gguf.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from server.models.arch_config import ArchConfig, read_config_json
from server.models.base import CausalLM, ModelOptions
from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf, open_gguf
from server.models.packed_int import PackedIntFormat, read_format
from server.models.registry import resolve_model_class

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


def resolve_dtype(dtype: str, arch: ArchConfig) -> torch.dtype:
    name = arch.torch_dtype if dtype == "auto" else dtype
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"dtype {name!r} is not supported; supported: "
                             f"{', '.join(_DTYPES)}") from None


def packed_int_format(model_dir: Path) -> PackedIntFormat | None:
    """A safetensors checkpoint's GPTQ or AWQ quantization (None: float weights, or GGUF)."""
    if find_gguf(model_dir) is not None:
        return None
    return read_format(read_config_json(model_dir))


def read_generation_defaults(model_dir: Path) -> GenerationDefaults:
    """EOS ids from generation_config.json (a list is allowed), else config.json; a GGUF
    file's from its tokenizer metadata."""
    gguf_file = find_gguf(model_dir)
    if gguf_file is not None:
        eos, bos = open_gguf(gguf_file).special_token_ids()
        return GenerationDefaults(eos_token_ids=eos, bos_token_id=bos)
    raw = json.loads((model_dir / "config.json").read_text())
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    eos_list = eos if isinstance(eos, list) else [eos]
    return GenerationDefaults(eos_token_ids=tuple(int(t) for t in eos_list if t is not None),
                              bos_token_id=gen.get("bos_token_id", raw.get("bos_token_id")))


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def _check_complete(model: CausalLM, loaded: set, model_dir: Path) -> None:
    missing = sorted(name if shard is None else f"{name}[shard {shard}]"
                     for name, shard in model.expected_weights() - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)"
                                          if len(missing) > 5 else "")
        raise ModelLoadError(f"the checkpoint in {model_dir} lacks tensors: {shown}")


def _open_weights(path: Path):
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"cannot read the weights file {path}: permission denied")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"cannot read the weights file {path}: {e}") from None


def load_model(model_dir: Path, arch: ArchConfig, options: ModelOptions,
               device: torch.device) -> CausalLM:
    """The family's model built on `device` with empty parameters, filled from the checkpoint
    by each parameter's weight_loader; every parameter must be filled."""
    model_cls = resolve_model_class(arch.architecture)
    gguf_file = find_gguf(model_dir)
    files = [] if gguf_file is not None else _weight_files(model_dir)
    with torch.device(device):
        model = model_cls(arch, options)
    if gguf_file is not None:
        gguf = open_gguf(gguf_file)
        keep = getattr(options.linear_method, "gguf_kinds", ())
        loaded = model.load_weights(tqdm(gguf.tensors(options.dtype, keep), total=gguf.num_tensors,
                                         desc="Loading weights", unit="tensor", leave=False))
        _check_complete(model, loaded, gguf_file)
        return model.eval()
    names: list[tuple[Path, str]] = []
    for path in files:
        names.extend((path, name) for name in _open_weights(path).keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        current: tuple[Path, Any] | None = None
        for path, name in tqdm(names, desc="Loading weights", unit="tensor", leave=False):
            if current is None or current[0] != path:
                current = (path, _open_weights(path))
            yield name, current[1].get_tensor(name)

    packed = packed_int_format(model_dir)
    weights: Iterable[tuple[str, Any]] = (tensors() if packed is None else packed.tensors(
        tensors(), {n for _, n in names}))
    _check_complete(model, model.load_weights(weights), model_dir)
    return model.eval()

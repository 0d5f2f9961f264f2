"""Load a Hugging Face model directory: config, generation config, safetensors weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from server.models.arch_config import ArchConfig
from server.models.errors import ModelLoadError
from server.models.layers.rotary import RotaryEmbedding
from server.models.registry import resolve_model_class

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Checkpoint tensors we know and do not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def read_generation_defaults(model_dir: Path) -> GenerationDefaults:
    """EOS ids from generation_config.json (a list is allowed), else config.json."""
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


class _WeightLoader:
    """Copies checkpoint tensors into the model, splitting them into fused parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.fused: dict[str, tuple[str, int]] = getattr(model, "fused_params", {})
        fused_names = {fused for fused, _ in self.fused.values()}
        # Every (parameter, shard) the checkpoint must provide; shard None: the whole tensor.
        self.expected: set[tuple[str, int | None]] = set()
        for name in self.params:
            owner = name.split(".")[-2] if "." in name else ""
            if owner in fused_names:
                count = len(model.shard_sizes(owner))  # type: ignore[operator]
                self.expected.update((name, i) for i in range(count))
            else:
                self.expected.add((name, None))
        self.loaded: set[tuple[str, int | None]] = set()

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name.endswith(_IGNORED_SUFFIXES):
            return
        if name == "lm_head.weight" and name not in self.params:
            return  # tied embeddings: some checkpoints still carry the copy
        parts = name.split(".")
        target, shard = name, None
        if len(parts) >= 2 and parts[-2] in self.fused:
            fused_name, shard = self.fused[parts[-2]]
            target = ".".join(parts[:-2] + [fused_name, parts[-1]])
        param = self.params.get(target)
        if param is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint")
        dest = param.data
        if shard is not None:
            sizes = self.model.shard_sizes(fused_name)  # type: ignore[operator]
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"shape mismatch for {name!r}: the checkpoint has "
                                 f"{tuple(tensor.shape)}, the config implies {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        self.loaded.add((target, shard))

    def check_complete(self, model_dir: Path) -> None:
        missing = sorted(f"{name}" if shard is None else f"{name}[shard {shard}]"
                         for name, shard in self.expected - self.loaded)
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


def load_model(model_dir: Path, arch: ArchConfig, dtype: torch.dtype, device: torch.device,
               max_position: int) -> nn.Module:
    model_cls = resolve_model_class(arch.architecture)
    files = _weight_files(model_dir)
    with torch.device("meta"):
        model = model_cls(arch, max_position)  # type: ignore[call-arg]
    model = model.to_empty(device=device).to(dtype=dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    loader = _WeightLoader(model)
    names: list[tuple[Path, str]] = []
    for path in files:
        names.extend((path, name) for name in _open_weights(path).keys())
    current: tuple[Path, object] | None = None
    for path, name in tqdm(names, desc="Loading weights", unit="tensor", leave=False):
        if current is None or current[0] != path:
            current = (path, _open_weights(path))
        loader.load(name, current[1].get_tensor(name))  # type: ignore[attr-defined]
    loader.check_complete(model_dir)
    return model.eval()

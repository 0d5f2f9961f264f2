"""The hyper-parameters of a Llama-shaped decoder, and the generic reading of config.json.

`ArchConfig.from_dict` reads the fields every Llama-family config has; a family's
`parse_config` (models/base.py) calls it and sets what is its own (registry.read_arch_config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.models.errors import ModelLoadError


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str
    hidden_act: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **family: Any) -> ArchConfig:
        """The Llama reading of config.json; `family`: fields a family sets itself (qkv_bias,
        qk_norm, sliding_window, ...)."""
        arch = architecture_of(raw)
        try:
            hidden_size = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            rope = raw.get("rope_parameters") or {}
            scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default")
                                                  != "default" else None)
            attention_bias = bool(raw.get("attention_bias", False))
            if raw.get("use_sliding_window"):
                raise ModelLoadError(f"{arch} with use_sliding_window=true is not supported")
            hidden_act = str(raw.get("hidden_act", "silu"))
            if hidden_act != "silu":  # the MLP (and the compiled CPU kernels) compute SiLU
                raise ModelLoadError(f"{arch} with hidden_act={hidden_act!r} is not supported "
                                     f"(only 'silu')")
            fields: dict[str, Any] = dict(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=dict(scaling) if scaling else None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=attention_bias,
                o_bias=attention_bias,
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=False,
                sliding_window=None,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                hidden_act=hidden_act,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the field {e.args[0]!r}") from None
        return cls(**{**fields, **family})

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")
                   or "default")


def architecture_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not archs:
        raise ModelLoadError("config.json has no 'architectures' entry")
    return str(archs[0])


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return raw

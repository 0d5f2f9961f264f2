"""GGUF model files (llama.cpp's and Ollama's format), read with the `gguf` package: the
hyper-parameters as the config.json fields the families parse, BOS/EOS, and the weights under
Hugging Face's tensor names, so a GGUF model loads through the same `load_weights` as a
safetensors checkpoint. The tokenizer comes from the file too (engine/tokenizer.py, through
transformers' GGUF tokenizer conversion).

The linear layers' quantized tensors stay blocks for the LinearMethod that takes them
(`gguf_kinds`, models/layers/quantized_linear.py); other quantized tensors are dequantized at
load into the model's dtype, one tensor at a time, with one warning per type.
llama.cpp's converter permutes the rows of a `llama` model's q and k projections for its rotary
layout; they are permuted back here.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

# general.architecture -> the Hugging Face architecture name of its family (models/registry.py)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# The tensor types this reader takes: enough for the Q4_K_M and Q5_K_M mixes, with the Q5_0,
# Q5_1 and Q8_0 that llama-quantize falls back to for rows of no multiple of 256.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                   "Q6_K")
_PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16"}  # the rest compute in float32

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# what takes blocks: a LinearMethod's layers, and the embedding (for a tied head)
_BLOCK_WEIGHTS = ("_proj.weight", "lm_head.weight", "embed_tokens.weight")
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass(frozen=True)
class Q8Blocks:
    """A [rows, cols] weight as a GGUF file's quantized blocks, `blocks` [rows, bytes] uint8 of
    type `kind` (one of pagedserve_kernels.cpu_quant.KINDS), for the LinearMethod that computes
    with them."""

    blocks: torch.Tensor
    shape: tuple[int, int]
    kind: str = "Q8_0"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the one *.gguf of a directory
    without a config.json; None when `path` is no GGUF model."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); give the path of the "
                             f"one to serve")
    return files[0] if files else None


class GGUFModel:
    """One GGUF file, opened memory-mapped; every problem with it is a ModelLoadError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if _SPLIT_FILE.search(path.name):
            raise ModelLoadError(f"{path.name} is one part of a split GGUF model, which is not "
                                 f"supported; merge the parts with llama.cpp's `llama-gguf-split "
                                 f"--merge` first")
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(str(path), "r")
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
            raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch_name = str(self.field("general.architecture"))
        if self.arch_name not in ARCHITECTURES:
            raise ModelLoadError(f"{path.name}: GGUF architecture {self.arch_name!r} is not "
                                 f"supported; supported: {', '.join(ARCHITECTURES)}")
        self._check_tensors()

    def field(self, key: str, default: Any = ...) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ModelLoadError(f"{self.path.name} lacks the GGUF metadata field {key!r}")
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelLoadError(f"{self.path.name}: cannot read the metadata field {key!r}: "
                                 f"{e}") from None

    def _arch_field(self, key: str, default: Any = ...) -> Any:
        return self.field(f"{self.arch_name}.{key}", default)

    def _check_tensors(self) -> None:
        for t in self._tensors.values():
            kind = t.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise ModelLoadError(f"{self.path.name}: tensor {t.name} has type {kind}, "
                                     f"which is not supported; supported: "
                                     f"{', '.join(SUPPORTED_TYPES)}")
            if t.data.nbytes != int(t.n_bytes):
                raise ModelLoadError(f"{self.path.name} is truncated: tensor {t.name} needs "
                                     f"{int(t.n_bytes)} bytes, the file holds {t.data.nbytes}")
        if "rope_freqs.weight" in self._tensors:
            raise ModelLoadError(f"{self.path.name} carries per-frequency rope factors "
                                 f"(rope_freqs.weight, Llama 3.1 rope scaling), which GGUF "
                                 f"loading does not support yet")

    def config(self) -> dict[str, Any]:
        """The model's hyper-parameters as config.json would give them."""
        heads = self._arch_field("attention.head_count")
        kv_heads = self._arch_field("attention.head_count_kv", heads)
        if isinstance(heads, list) or isinstance(kv_heads, list):
            raise ModelLoadError(f"{self.path.name}: a head count per layer is not supported")
        hidden = int(self._arch_field("embedding_length"))
        head_dim = int(self._arch_field("attention.key_length", hidden // int(heads)))
        rotary_dim = int(self._arch_field("rope.dimension_count", head_dim))
        if rotary_dim != head_dim:
            raise ModelLoadError(f"{self.path.name}: rotary over {rotary_dim} of {head_dim} "
                                 f"head dimensions is not supported")
        tokens = self.field("tokenizer.ggml.tokens", None)
        vocab = self._arch_field("vocab_size", len(tokens) if tokens is not None else None)
        if vocab is None:
            vocab = int(self._tensors["token_embd.weight"].shape[1])
        raw: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch_name]],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_field("context_length")),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "torch_dtype": self._compute_dtype(),
        }
        scaling = self._arch_field("rope.scaling.type", "none")
        if scaling not in ("none", "linear", "yarn"):
            raise ModelLoadError(f"{self.path.name}: rope scaling {scaling!r} is not supported")
        if scaling != "none":
            raw["rope_scaling"] = {"rope_type": scaling,
                                   "factor": float(self._arch_field("rope.scaling.factor"))}
            original = self._arch_field("rope.scaling.original_context_length", None)
            if original is not None:
                raw["rope_scaling"]["original_max_position_embeddings"] = int(original)
        return raw

    def _compute_dtype(self) -> str:
        """F16 and BF16 files compute in their dtype; F32 and quantized ones in float32, as
        llama.cpp computes them."""
        kinds = Counter(t.tensor_type.name for t in self._tensors.values() if len(t.shape) == 2)
        return _DTYPE_NAMES.get(kinds.most_common(1)[0][0], "float32") if kinds else "float32"

    def special_token_ids(self) -> tuple[tuple[int, ...], int | None]:
        """(the end-of-generation ids: EOS, EOT and EOM where present; BOS)."""
        ends = [self.field(f"tokenizer.ggml.{kind}_token_id", None)
                for kind in ("eos", "eot", "eom")]
        bos = self.field("tokenizer.ggml.bos_token_id", None)
        return tuple(dict.fromkeys(int(t) for t in ends if t is not None)), (
            None if bos is None else int(bos))

    @property
    def num_tensors(self) -> int:
        return len(self._tensors)

    def tensors(self, dtype: torch.dtype, keep: Sequence[str] = ()
                ) -> Iterator[tuple[str, torch.Tensor | Q8Blocks]]:
        """(Hugging Face name, tensor) for every tensor; the linear layers' and the embedding's
        tensors of a type in `keep` (the LinearMethod's `gguf_kinds`) as their blocks, other
        quantized ones dequantized to `dtype`."""
        from gguf.quants import dequantize

        dequantized: Counter[str] = Counter()
        requantized = 0
        for name, t in self._tensors.items():
            hf_name = self._hf_name(name)
            kind = t.tensor_type.name
            if kind in keep and hf_name.endswith(_BLOCK_WEIGHTS):
                blocks = self._unpermute(name, torch.from_numpy(np.array(t.data)))
                shape = _shape(t)
                yield hf_name, Q8Blocks(blocks, (shape[0], shape[1]), kind)
                requantized += kind == "Q6_K"
                continue
            if kind in _PLAIN_TYPES:
                data = np.array(t.data)  # a copy: the memory map stays read-only
                tensor = (torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
                          if kind == "BF16" else torch.from_numpy(data))
            else:
                tensor = torch.from_numpy(dequantize(t.data, t.tensor_type)).to(dtype)
                dequantized[kind] += 1
            yield hf_name, self._unpermute(name, tensor.reshape(_shape(t)))
        for kind, count in sorted(dequantized.items()):
            logger.warning("GGUF tensor type %s (%d tensors) has no kernel here yet: "
                           "dequantized to %s at load", kind, count, str(dtype).split(".")[-1])
        if requantized:
            logger.info("GGUF tensor type Q6_K (%d tensors): requantized to 8-bit blocks of 32 "
                        "values where the 8-bit GEMM runs (its scales cover 16)", requantized)

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None or match.group(2) not in _LAYER_NAMES:
            raise ModelLoadError(f"{self.path.name}: tensor {name!r} is not one a "
                                 f"{self.arch_name} model has")
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"

    def _unpermute(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's q/k row permutation (`llama` files only): within each head, its
        converter interleaves the two rotary halves' rows."""
        part = name.split(".")[2] if name.startswith("blk.") else ""
        if self.arch_name != "llama" or part not in ("attn_q", "attn_k"):
            return tensor
        heads = int(self._arch_field("attention.head_count"))
        if part == "attn_k":
            heads = int(self._arch_field("attention.head_count_kv", heads))
        rows = tensor.shape[0]
        return (tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2)
                .reshape(tensor.shape).contiguous())


def file_version(path: Path) -> tuple[str, int, int]:
    """A key that changes when the file is rewritten: for caches of what is read from it."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def open_gguf(path: Path) -> GGUFModel:
    """The file parsed once per version (start-up reads its config, its special ids and its
    tensors in three places)."""
    return _open_version(*file_version(path))


@functools.lru_cache(maxsize=2)  # each holds the file's memory map
def _open_version(path: str, mtime_ns: int, size: int) -> GGUFModel:
    return GGUFModel(Path(path))


def _shape(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch's order (GGUF lists the fastest dimension first)."""
    return tuple(int(d) for d in reversed(list(t.shape)))

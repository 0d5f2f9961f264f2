"""GGUF files for tests, written with the `gguf` package's writer from a tiny Hugging Face model
directory (tests/model_factory.py), in llama.cpp's layout: its metadata keys and tensor names,
the q/k rows of a `llama` model permuted as its converter permutes them, and the tokenizer as
its converter writes a Hugging Face tokenizer.json (`gguf.LlamaHfVocab`).

Weights of two dimensions take `weight_type`. F32, F16, BF16, Q8_0, Q4_0 and Q4_1 come from the
`gguf` package's quantizer. It has none for the k-quants, so Q4_K, Q5_K and Q6_K tensors are
random blocks with their scales set so that the values fall in the weights' range; a model
with them is a different model, whose reference is transformers' own GGUF loading of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# k-quant block layouts: bytes per 256 values, and where its fp16 scales sit (offset, value)
_K_QUANTS = {"Q4_K": (144, ((0, 5e-5), (2, 2.5e-4))), "Q5_K": (176, ((0, 2.5e-5), (2, 2.5e-4))),
             "Q6_K": (210, ((208, 1e-5),))}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_NAMES[part]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for a llama q/k projection."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def random_k_blocks(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    block_bytes, scales = _K_QUANTS[kind]
    rows, cols = shape
    assert cols % 256 == 0, f"{kind} needs rows of a multiple of 256 values, not {cols}"
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset, value in scales:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 256 * block_bytes)


def write_gguf(model_dir: Path, out: Path, weight_type: str = "F32",
               types: dict[str, str] | None = None) -> Path:
    """model_dir as one GGUF file at `out`; `types` overrides `weight_type` per GGUF tensor
    name."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = _ARCHS[config["architectures"][0]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = gguf.LlamaHfVocab(model_dir)
    tokens, scores, token_types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(token_types))
    gguf.SpecialVocab(model_dir, load_merges=False).add_to_gguf(writer)
    for i, (hf_name, tensor) in enumerate(sorted(load_file(model_dir / "model.safetensors")
                                                 .items())):
        name = gguf_name(hf_name)
        data = tensor.to(torch.float32).numpy()
        if arch == "llama" and name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            data = permute(data, heads if ".attn_q." in name else kv_heads)
        kind = (types or {}).get(name, weight_type) if data.ndim == 2 else "F32"
        if kind in _K_QUANTS:
            writer.add_tensor(name, random_k_blocks(data.shape, kind, seed=i),
                              raw_dtype=gguf.GGMLQuantizationType[kind])
        elif kind in ("F32", "F16"):
            writer.add_tensor(name, data.astype(np.float16 if kind == "F16" else np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def hf_greedy_gguf(path: Path, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by transformers' own loading of the GGUF file (dequantized)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = list(prompt_token_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_token_ids):]

"""GGUF model files (server/models/gguf.py): a GGUF copy of each tiny parity model gives
transformers' greedy tokens of the original checkpoint; each quantized tensor type gives
transformers' greedy tokens of its own loading of the same file; the hyper-parameters, the
tokenizer and BOS/EOS come from the metadata; a directory holding one file serves it; a
damaged, truncated or unsupported file stops loading with one clear message."""

from __future__ import annotations

import logging
import shutil

import gguf
import numpy as np
import pytest

from server import LLM, SamplingParams
from server.engine.tokenizer import load_tokenizer
from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf, open_gguf
from server.models.layers.quantized_linear import Int8LinearMethod
from server.models.loader import read_generation_defaults
from server.models.registry import read_arch_config
from tests.gguf_factory import hf_greedy_gguf, write_gguf
from tests.model_factory import hf_greedy, make_tiny_model
from tests.models.conftest import random_prompts

SMALL_CACHE = 1 << 22
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints for GGUF copies: llama without llama3 rope (llama.cpp writes that as
    a rope_freqs tensor, not loaded yet), qwen2, qwen3, and a llama whose rows are a multiple
    of 256 values for the k-quants."""
    root = tmp_path_factory.mktemp("gguf-models")
    return {
        "llama": make_tiny_model(root / "llama", "llama", rope_scaling=None),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2"),
        "qwen3": make_tiny_model(root / "qwen3", "qwen3"),
        "llama-256": make_tiny_model(root / "llama-256", "llama", rope_scaling=None,
                                     hidden_size=256, intermediate_size=512),
    }


def greedy(path, prompts, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), **{"kv_cache_memory": SMALL_CACHE, **kwargs})
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_an_f32_copy_gives_the_checkpoints_tokens(arch, tiny, tmp_path):
    path = write_gguf(tiny[arch], tmp_path / f"{arch}.gguf")
    prompts = random_prompts(seed=11, count=4, min_len=3, max_len=30)
    assert greedy(path, prompts) == [hf_greedy(tiny[arch], p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("model,kind", [("llama", "F16"), ("llama", "BF16"),

                                        ("llama-256", "Q4_K"), ("llama-256", "Q5_K"),
                                        ("llama-256", "Q6_K")])
def test_each_tensor_type_gives_transformers_tokens_of_the_file(model, kind, tiny, tmp_path,
                                                                caplog, monkeypatch):
    """Each type's values, dequantized at load (the 8-bit method told to keep no blocks; as
    served, the quantized types stay blocks: tests/models/test_quantized_linear.py).
    Not on the qwen3 model: transformers' GGUF loading ignores its head_dim
    (`attention.key_length`), which its F32 copy above checks against the checkpoint."""
    path = write_gguf(tiny[model], tmp_path / f"{model}-{kind}.gguf", kind)
    prompts = random_prompts(seed=12, count=3, min_len=3, max_len=30)
    with caplog.at_level(logging.WARNING, logger="server.models.gguf"):
        monkeypatch.setattr(Int8LinearMethod, "gguf_kinds", ())
        tokens = greedy(path, prompts, dtype="float32")
    assert tokens == [hf_greedy_gguf(path, p, NEW_TOKENS) for p in prompts]
    quantized = kind not in ("F16", "BF16")
    assert (f"GGUF tensor type {kind}" in caplog.text) == quantized, caplog.text


def test_a_mix_of_types_like_q4_k_m(tiny, tmp_path, monkeypatch):
    """Q4_K_M keeps some tensors at Q6_K and the norms at F32 (dequantized at load, as above)."""
    monkeypatch.setattr(Int8LinearMethod, "gguf_kinds", ())
    types = {"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K",
             "token_embd.weight": "Q8_0"}
    path = write_gguf(tiny["llama-256"], tmp_path / "mix.gguf", "Q4_K", types)
    prompts = random_prompts(seed=13, count=2, min_len=5, max_len=20)
    assert greedy(path, prompts, dtype="float32") == [hf_greedy_gguf(path, p, NEW_TOKENS)
                                                      for p in prompts]


def test_config_dtype_tokenizer_and_special_ids_come_from_the_file(tiny, tmp_path):
    path = write_gguf(tiny["qwen3"], tmp_path / "q.gguf", "BF16")
    arch = read_arch_config(path)
    assert (arch.architecture, arch.num_layers, arch.hidden_size, arch.head_dim) == (
        "Qwen3ForCausalLM", 2, 64, 32)
    assert arch.qk_norm and not arch.tie_word_embeddings and arch.torch_dtype == "bfloat16"
    assert read_arch_config(write_gguf(tiny["qwen2"], tmp_path / "t.gguf", "Q8_0")).torch_dtype \
        == "float32"
    assert read_arch_config(tmp_path / "t.gguf").tie_word_embeddings
    defaults = read_generation_defaults(path)
    assert defaults.eos_token_ids == (2,) and defaults.bos_token_id == 1
    tokenizer = load_tokenizer(path)
    original = load_tokenizer(tiny["qwen3"])
    ids = original.encode("Once upon a time there was a cat.", add_special_tokens=False)
    assert tokenizer.decode(ids) == original.decode(ids)
    assert len(tokenizer) == len(original) and tokenizer.eos_token_id == 2


def test_a_directory_holding_one_file_serves_it(tiny, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    path = write_gguf(tiny["qwen2"], folder / "model.gguf", "Q8_0")
    assert find_gguf(folder) == path and find_gguf(tiny["qwen2"]) is None
    prompts = random_prompts(seed=14, count=2, min_len=3, max_len=10)
    assert greedy(folder, prompts, dtype="float32") == greedy(path, prompts, dtype="float32")
    shutil.copy(path, folder / "other.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files.*model.gguf, other.gguf"):
        LLM(str(folder), kv_cache_memory=SMALL_CACHE)


def test_damaged_truncated_and_split_files_are_refused(tiny, tmp_path):
    path = write_gguf(tiny["qwen2"], tmp_path / "m.gguf", "Q8_0")
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ModelLoadError, match="bad.gguf is not a readable GGUF file"):
        LLM(str(bad))
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ModelLoadError, match="short.gguf"):
        LLM(str(short))
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:200])
    with pytest.raises(ModelLoadError, match="header.gguf is not a readable GGUF file"):
        LLM(str(header))
    split = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(path, split)
    with pytest.raises(ModelLoadError, match="split GGUF model.*llama-gguf-split"):
        LLM(str(split))


def _rewrite(source, out, arch=None, extra_tensor=None, drop=None, retype=None):
    """A copy of `source` with another architecture name, one more or one fewer tensor, or
    one tensor stored as another type."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture",):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        if t.name == drop:
            continue
        if t.name == (retype or (None,))[0]:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            kind = retype[1]
            writer.add_tensor(t.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
            continue
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_a_file_is_parsed_once_per_version(tiny, tmp_path):
    """Start-up reads config, special ids and tensors: one parse (seconds for a real file)."""
    path = write_gguf(tiny["llama"], tmp_path / "m.gguf", "Q8_0")
    first = open_gguf(path)
    assert open_gguf(path) is first
    write_gguf(tiny["llama"], path, "Q4_0")  # rewritten: another size
    assert open_gguf(path) is not first


def test_a_files_tokenizer_is_converted_once_and_each_caller_gets_its_own(tiny, tmp_path,
                                                                           monkeypatch):
    from transformers import AutoTokenizer

    path = write_gguf(tiny["qwen2"], tmp_path / "t.gguf", "F32")
    calls = []
    convert = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(k.get("gguf_file")) or convert(*a, **k))
    first, second = load_tokenizer(path), load_tokenizer(tmp_path)
    assert calls == ["t.gguf"] and first is not second
    assert first._tokenizer is not second._tokenizer  # the Rust tokenizer too: no sharing
    assert first("a b c").input_ids == second("a b c").input_ids


def test_unsupported_contents_are_named(tiny, tmp_path):
    path = write_gguf(tiny["qwen2"], tmp_path / "m.gguf", "Q8_0")
    cases = [
        (dict(arch="phi3"), "GGUF architecture 'phi3' is not supported"),
        (dict(retype=("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.MXFP4)),
         "tensor blk.0.ffn_up.weight has type MXFP4, which is not supported"),
        (dict(extra_tensor="rope_freqs.weight"), "rope_freqs.weight"),
        (dict(extra_tensor="blk.0.attn_gate.weight"), "'blk.0.attn_gate.weight' is not one"),
        (dict(drop="blk.1.ffn_down.weight"), "lacks tensors: model.layers.1.mlp.down_proj"),
    ]
    for i, (change, message) in enumerate(cases):
        out = _rewrite(path, tmp_path / f"case{i}.gguf", **change)
        with pytest.raises(ModelLoadError, match=message):
            LLM(str(out), kv_cache_memory=SMALL_CACHE)


def test_the_real_instruct_model_file_agrees_with_the_converted_directory(smollm2_dir):
    """SmolLM2-135M-Instruct's own Q4_1 file (9 heads, 3 kv heads: llama.cpp's q/k row order
    undone) served directly, on its blocks with 8-bit activations (as llama.cpp's Q4_1 x Q8_1
    dot products), against the fp32 directory transformers made from it: nearly the same top 5
    after each prompt, at nearly the same logprobs (a wrong row order or scale gives unrelated
    tokens; here the first prompt's top two are 0.05 apart, so the argmax may swap)."""
    from tests import real_model

    path = real_model.gguf_path()
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 30], [1, 47, 2],
               [1, 9690, 198, 2683, 359, 253, 7018, 30]]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    runs = []
    for source in (path, smollm2_dir):
        llm = LLM(str(source), max_model_len=real_model.MAX_MODEL_LEN, dtype="float32",
                  kv_cache_memory=128 << 20)
        runs.append([o.outputs[0] for o in llm.generate(prompts, params)])
    for ours, theirs in zip(*runs):
        shared = set(ours.logprobs[0]) & set(theirs.logprobs[0])
        assert len(shared) >= 4 and ours.token_ids[0] in theirs.logprobs[0]
        assert max(abs(ours.logprobs[0][t] - theirs.logprobs[0][t]) for t in shared) < 0.75
    tokenizer = load_tokenizer(path)
    assert "<|im_start|>" in tokenizer.chat_template
    assert read_generation_defaults(path).eos_token_ids == (2,)

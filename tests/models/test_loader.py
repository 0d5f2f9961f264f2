"""Loading model directories: sharded weights, dtypes, eos lists, and clear start-up errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from server import LLM, SamplingParams
from server.models.errors import ModelLoadError
from tests.model_factory import make_tiny_model

SMALL_CACHE = 1 << 22
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture
def llama_dir(tmp_path, model_dirs):
    target = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], target)
    return target


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_sharded_checkpoint_loads_identically(tmp_path, model_dirs, reference):
    import transformers

    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model_dirs["qwen2"] / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = [1, 40, 41, 42, 43, 44]
    out = LLM(str(sharded), kv_cache_memory=SMALL_CACHE).generate([prompt], GREEDY)[0]
    assert out.outputs[0].token_ids == reference(model_dirs["qwen2"], prompt, 8)


@pytest.mark.parametrize("saved,asked,expected", [
    ("bfloat16", "auto", torch.bfloat16),
    ("float16", "auto", torch.float16),
    ("float32", "bfloat16", torch.bfloat16),
    ("bfloat16", "float32", torch.float32),
])
def test_dtype(tmp_path, saved, asked, expected):
    model_dir = make_tiny_model(tmp_path / "m", "qwen3", dtype=saved)
    llm = LLM(str(model_dir), kv_cache_memory=SMALL_CACHE, dtype=asked)
    assert next(llm.engine.runner.model.parameters()).dtype == expected
    assert llm.engine.runner.kv_caches[0][0].dtype == expected
    out = llm.generate([[1, 7, 8, 9]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 8


def test_eos_list_from_generation_config(llama_dir):
    (llama_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    llm = LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)
    assert llm.engine.generation.eos_token_ids == (2, 7)


def test_unsupported_architecture(llama_dir):
    edit_config(llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)


def test_unsupported_activation(llama_dir):
    edit_config(llama_dir, hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="hidden_act='gelu' is not supported"):
        LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)


def test_missing_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_shape_mismatch_names_the_tensor(llama_dir):
    edit_config(llama_dir, intermediate_size=96)
    with pytest.raises(ModelLoadError,
                       match=r"shape mismatch for 'model.layers.0.mlp.\w+_proj.weight'.*implies"):
        LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)


def test_missing_tensor_is_named(tmp_path, model_dirs):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], target)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks tensors: model.layers.1.self_attn.qkv_proj"):
        LLM(str(target), kv_cache_memory=SMALL_CACHE)


def test_kv_cache_too_small_for_one_sequence(model_dirs):
    with pytest.raises(ModelLoadError, match="raise kv_cache_memory or lower max_model_len"):
        LLM(str(model_dirs["llama"]), kv_cache_memory=1000)


def test_max_model_len_beyond_the_model(model_dirs):
    with pytest.raises(ModelLoadError, match="max_position_embeddings=256"):
        LLM(str(model_dirs["llama"]), kv_cache_memory=SMALL_CACHE, max_model_len=1000)


def test_damaged_weights_file(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read the weights file"):
        LLM(str(llama_dir), kv_cache_memory=SMALL_CACHE)

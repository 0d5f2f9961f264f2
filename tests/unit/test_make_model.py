"""`pagedserve bench make-model`: shapes, loadability (transformers and pagedserve), greedy
parity, the locally trained tokenizer, and byte-for-byte reproducibility."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from server.bench import make_model as mm

TINY = mm.PRESETS["tiny"].config
TEXTS = ["Hello world, this is a test.", "  two spaces\tand a tab\nnew line",
         "Ünïcödé — 中文 and emoji 🙂 ok", "code(x, y) = {'a': 1} # 12345", ""]


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    mm.add_arguments(parser)
    return mm.main(parser.parse_args(argv))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("make_model") / "tiny"
    assert run_main(["--preset", "tiny", "--out", str(out)]) == 0
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_tiny_preset_shapes(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert config[key] == TINY[key], key
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float32"
    tensors = _tensors(tiny_dir)
    h, i, v, hd = 64, 128, 512, 16
    assert tensors["model.embed_tokens.weight"].shape == (v, h)
    assert "lm_head.weight" not in tensors  # tied
    layer = "model.layers.1."
    assert tensors[layer + "self_attn.q_proj.weight"].shape == (4 * hd, h)
    assert tensors[layer + "self_attn.k_proj.weight"].shape == (2 * hd, h)
    assert tensors[layer + "self_attn.v_proj.weight"].shape == (2 * hd, h)
    assert tensors[layer + "self_attn.o_proj.weight"].shape == (h, 4 * hd)
    assert tensors[layer + "mlp.gate_proj.weight"].shape == (i, h)
    assert tensors[layer + "mlp.down_proj.weight"].shape == (h, i)
    assert len(tensors) == 2 * 9 + 2
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == 106_816


def test_loadable_by_transformers_and_pagedserve_with_greedy_parity(tiny_dir):
    from transformers import AutoModelForCausalLM

    from server import LLM, SamplingParams
    from tests.model_factory import hf_greedy

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.config.rope_parameters["rope_theta"] == 100000.0
    llm = LLM(str(tiny_dir), kv_cache_memory=1 << 24)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(TEXTS[:3], params)
    for text, out in zip(TEXTS[:3], outputs):
        assert out.prompt_token_ids == llm.tokenizer(text).input_ids
        assert out.outputs[0].token_ids == hf_greedy(tiny_dir, out.prompt_token_ids, 6)
    # the output is not degenerate: random weights still pick varied tokens
    assert len({t for out in outputs for t in out.outputs[0].token_ids}) > 3


def test_tokenizer_round_trips_and_matches_config(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert len(tok) == tok.vocab_size == config["vocab_size"]
    assert tok.bos_token_id == config["bos_token_id"] == 1
    assert tok.eos_token_id == config["eos_token_id"] == 2
    assert tok.pad_token_id == config["pad_token_id"] == 2
    assert tok.unk_token_id == 0
    assert tok.convert_ids_to_tokens([0, 1, 2]) == list(mm.SPECIAL_TOKENS)
    for text in TEXTS:
        ids = tok(text).input_ids
        assert all(0 <= t < config["vocab_size"] for t in ids)
        assert tok.decode(ids) == text
    word_ids = tok(" the quick brown fox").input_ids
    assert word_ids and word_ids[0] != tok.bos_token_id  # no bos added, like SmolLM2
    # BPE merges were learned: common synthetic text takes fewer ids than bytes
    sample = " ".join(mm.synthetic_corpus(0, 3000, 5)[-5:])
    assert len(tok(sample).input_ids) < len(sample.encode()) / 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_end|>").input_ids == [2]


def test_same_seed_gives_identical_bytes(tiny_dir, tmp_path, capsys):
    again = tmp_path / "again"
    assert run_main(["--preset", "tiny", "--out", str(again), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert str(again) in printed and "106,816 parameters" in printed
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "seed1"
    mm.make_model("tiny", other, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors"
                                                          ).read_bytes()


def test_dtype_rounds_the_same_weights(tiny_dir, tmp_path):
    mm.make_model("tiny", tmp_path / "bf16", seed=0, dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    fp32, bf16 = _tensors(tiny_dir), _tensors(tmp_path / "bf16")
    for name, t in fp32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name


def test_smollm2_preset_config_and_tokenizer():
    config = mm.build_config("smollm2-135m")
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == \
        (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    # SmolLM2-135M's published parameter count (tied embeddings counted once)
    assert mm.num_parameters(config) == 134_515_008
    spec = mm.PRESETS["smollm2-135m"]
    tokenizer = mm.train_tokenizer(49152, 0, spec.num_corpus_words, spec.num_corpus_sentences)
    assert tokenizer.get_vocab_size() == 49152
    assert [tokenizer.token_to_id(t) for t in mm.SPECIAL_TOKENS] == [0, 1, 2]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        mm.make_model("nope", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        mm.make_model("tiny", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="num_corpus_words"):
        mm.train_tokenizer(5000, 0, num_words=20, num_sentences=5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_test_presets_are_the_tests_models(arch, tmp_path):
    """tests/model_factory.py's models are this maker's `test-*` presets: the architecture, the
    bundled tokenizer copied, and (qwen2) biases that are not all zero."""
    from server.assets import BUNDLED_MODEL_DIR
    from tests.model_factory import ARCH_VARIANTS, make_tiny_model

    assert ARCH_VARIANTS[arch] == f"test-{arch}"
    out = make_tiny_model(tmp_path / arch, arch, seed=1, num_hidden_layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [mm.PRESETS[f"test-{arch}"].architecture]
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 512
    assert (out / "tokenizer.json").read_bytes() == (BUNDLED_MODEL_DIR / "tokenizer.json"
                                                     ).read_bytes()
    tensors = _tensors(out)
    biases = [t for name, t in tensors.items() if name.endswith("_proj.bias")]
    assert len(biases) == (3 if arch == "qwen2" else 0)
    assert all(b.abs().sum() > 0 for b in biases)

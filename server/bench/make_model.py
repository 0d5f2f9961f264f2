"""`pagedserve bench make-model`: a reproducible random-weight model directory, no downloads.

The one maker of random-weight models: the tests' tiny models (tests/model_factory.py) are the
`test-*` presets here. Writes a Hugging Face directory (config.json, model.safetensors,
generation_config.json) with random weights drawn from a fixed seed by transformers' own
initialisation, and a tokenizer: either a byte-level BPE one trained here with the `tokenizers`
library on synthetic text generated from the same seed, or the bundled stories260k one (512 ids)
copied. The same seed gives byte-identical files. Presets:

* `smollm2-135m`: SmolLM2-135M's architecture (LlamaForCausalLM, hidden 576, 30 layers, 9 heads,
  3 KV heads, vocab 49152, tied embeddings), the benchmark model of issue 5.
* `tiny`: the same shape family at test size (2 layers, hidden 64, vocab 512).
* `test-llama`, `test-qwen2`, `test-qwen3`, `test-mistral`: the architecture variants the parity
  tests run (2 layers, hidden 64, vocab 512, the bundled tokenizer).

Special tokens of the trained tokenizer follow SmolLM2-Instruct: `<|endoftext|>` (0, unk),
`<|im_start|>` (1, bos), `<|im_end|>` (2, eos and pad), with a ChatML chat template. No bos is
added on encode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.assets import BUNDLED_MODEL_DIR
from server.config import DTYPES

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
PAD_TOKEN = EOS_TOKEN
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}
_BUNDLED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_SPECIAL_IDS = dict(bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
                    eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
                    pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN))


@dataclass(frozen=True)
class Preset:
    config: dict  # keyword arguments of `config_class`
    # The tokenizer is trained on this many distinct synthetic words and sentences; 0: the
    # bundled stories260k tokenizer (512 ids, bos 1, eos 2) is copied instead.
    num_corpus_words: int = 0
    num_corpus_sentences: int = 0
    description: str = ""
    config_class: str = "LlamaConfig"  # a transformers config class; the model is its *ForCausalLM
    # > 0: q/k/v projection biases are redrawn from N(0, std) so they matter (they init to 0).
    attention_bias_std: float = 0.0

    @property
    def architecture(self) -> str:
        return self.config_class.removesuffix("Config") + "ForCausalLM"


# The tests' architecture variants: tiny, with weights large enough that greedy choices are not
# near-ties, and the bundled tokenizer's vocabulary and special ids.
_TEST_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, initializer_range=0.2)


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, hidden_act="silu", max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    attention_bias=False, mlp_bias=False,
                    initializer_range=0.041666666666666664, **_SPECIAL_IDS),
        num_corpus_words=60000, num_corpus_sentences=40000,
        description="SmolLM2-135M architecture, random weights"),
    "tiny": Preset(
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, hidden_act="silu", max_position_embeddings=1024,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    attention_bias=False, mlp_bias=False,
                    # larger than usual so greedy choices are not near-ties
                    initializer_range=0.2, **_SPECIAL_IDS),
        num_corpus_words=3000, num_corpus_sentences=2000,
        description="test-size Llama, random weights"),
    "test-llama": Preset(
        config=dict(_TEST_COMMON, num_key_value_heads=1, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32}),
        description="test Llama: llama3 rope scaling, untied head, GQA 4:1"),
    "test-qwen2": Preset(
        config=dict(_TEST_COMMON, tie_word_embeddings=True), config_class="Qwen2Config",
        attention_bias_std=0.2, description="test Qwen2: q/k/v biases, tied embeddings"),
    "test-qwen3": Preset(
        config=dict(_TEST_COMMON, head_dim=32, tie_word_embeddings=False),
        config_class="Qwen3Config", description="test Qwen3: q/k RMSNorm, head_dim 32 != 64 / 4"),
    "test-mistral": Preset(
        config=dict(_TEST_COMMON, sliding_window=12, tie_word_embeddings=False),
        config_class="MistralConfig",
        description="test Mistral: a 12-token sliding window, shorter than the test prompts"),
}

# Syllables of the synthetic language the tokenizer is trained on.
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "st", "str",
           "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ia", "io", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rk", "st", "x")
_PUNCT = (".", ".", ".", "?", "!", ",", ";", ":")


def build_config(preset: str, **overrides):
    """The preset's transformers config; `overrides` replace or add config keyword arguments."""
    import transformers

    spec = PRESETS[preset]
    config = getattr(transformers, spec.config_class)(**{**spec.config, **overrides})
    config.architectures = [spec.architecture]
    return config


def num_parameters(config) -> int:
    """Parameters of the model `config` describes (tied embeddings counted once), no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def synthetic_corpus(seed: int, num_words: int, num_sentences: int) -> list[str]:
    """Deterministic text: every word of a random syllable lexicon once, then Zipf sentences
    with capitals, punctuation, numbers, a little non-ASCII and code-like lines."""
    rng = random.Random(seed)
    lexicon: set[str] = set()
    while len(lexicon) < num_words:
        num_syllables = rng.choice((1, 2, 2, 3, 3, 4))
        lexicon.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                            for _ in range(num_syllables)))
    words = sorted(lexicon)
    rng.shuffle(words)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    lines = [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    for _ in range(num_sentences):
        sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 18))
        sentence[0] = sentence[0].capitalize()
        roll = rng.random()
        if roll < 0.2:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randrange(100000)))
        elif roll < 0.25:
            sentence.insert(rng.randrange(len(sentence)), rng.choice("éüñçøßλжあ中€—"))
        elif roll < 0.3:
            sentence = [f"{sentence[0].lower()}({sentence[1]}, {sentence[-1]}) = {{}}"]
        lines.append(" ".join(sentence) + rng.choice(_PUNCT))
    return lines


def train_tokenizer(vocab_size: int, seed: int, num_words: int, num_sentences: int):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(synthetic_corpus(seed, num_words, num_sentences), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the synthetic corpus gave {tokenizer.get_vocab_size()} tokens, "
                         f"not {vocab_size}: raise the preset's num_corpus_words")
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json that transformers 4.x and 5.x both load as
    a fast tokenizer (class name and chat template spelled the portable way)."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
                   pad_token=PAD_TOKEN)
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _add_legacy_config_keys(path: Path, config) -> None:
    """transformers 5 writes rope_theta inside rope_parameters and the dtype as "dtype"; older
    readers (e.g. another server's transformers 4.x) look for the top-level keys."""
    raw = json.loads(path.read_text())
    raw.setdefault("rope_theta", config.rope_parameters["rope_theta"])
    raw.setdefault("torch_dtype", raw.get("dtype", "float32"))
    _write_json(path, raw)


def _redraw_attention_biases(model, std: float) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, std)


def make_model(preset: str, out_dir: Path, seed: int = 0, dtype: str = "float32",
               **overrides) -> int:
    """Write the preset's model directory; returns its parameter count. `overrides` are
    config keyword arguments (build_config's)."""
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    spec = PRESETS[preset]
    config = build_config(preset, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.attention_bias_std:
        _redraw_attention_biases(model, spec.attention_bias_std)
    model = model.to(_DTYPES[dtype])  # same values whatever the dtype, rounded
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    _add_legacy_config_keys(out_dir / "config.json", config)
    if spec.num_corpus_words:
        tokenizer = train_tokenizer(config.vocab_size, seed, spec.num_corpus_words,
                                    spec.num_corpus_sentences)
        save_tokenizer(tokenizer, out_dir, config.max_position_embeddings)
    else:
        for name in _BUNDLED_TOKENIZER_FILES:
            shutil.copy(BUNDLED_MODEL_DIR / name, out_dir / name)
    return sum(p.numel() for p in model.parameters())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS),
                        help="; ".join(f"{name}: {spec.description}"
                                       for name, spec in PRESETS.items()))
    parser.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and tokenizer")
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES),
                        help="dtype of the saved weights")


def main(args) -> int:
    start = time.perf_counter()
    out_dir = Path(args.out)
    num_params = make_model(args.preset, out_dir, seed=args.seed, dtype=args.dtype)
    elapsed = time.perf_counter() - start
    print(f"{out_dir}: {args.preset} ({PRESETS[args.preset].description}), "
          f"{num_params:,} parameters, {args.dtype}, seed {args.seed}, {elapsed:.1f} s")
    return 0

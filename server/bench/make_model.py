"""`pagedserve bench make-model`: a reproducible random-weight model directory, no downloads.

Writes a Hugging Face directory (config.json, model.safetensors, generation_config.json) with
random weights drawn from a fixed seed by transformers' own initialisation, and a byte-level BPE
tokenizer trained here with the `tokenizers` library on synthetic text generated from the same
seed. The same seed gives byte-identical files. Presets:

* `smollm2-135m`: SmolLM2-135M's architecture (LlamaForCausalLM, hidden 576, 30 layers, 9 heads,
  3 KV heads, vocab 49152, tied embeddings), the benchmark model of issue 5.
* `tiny`: the same shape family at test size (2 layers, hidden 64, vocab 512).

Special tokens follow SmolLM2-Instruct: `<|endoftext|>` (0, unk), `<|im_start|>` (1, bos),
`<|im_end|>` (2, eos and pad), with a ChatML chat template. No bos is added on encode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
PAD_TOKEN = EOS_TOKEN
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_SPECIAL_IDS = dict(bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
                    eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
                    pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN))


@dataclass(frozen=True)
class Preset:
    config: dict  # LlamaConfig keyword arguments
    num_corpus_words: int  # distinct synthetic words the tokenizer is trained on
    num_corpus_sentences: int
    description: str = ""


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
}

# Syllables of the synthetic language the tokenizer is trained on.
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "st", "str",
           "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ia", "io", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rk", "st", "x")
_PUNCT = (".", ".", ".", "?", "!", ",", ";", ":")


def build_config(preset: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**PRESETS[preset].config)
    config.architectures = ["LlamaForCausalLM"]
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


def make_model(preset: str, out_dir: Path, seed: int = 0, dtype: str = "float32") -> int:
    """Write the preset's model directory; returns its parameter count."""
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    spec = PRESETS[preset]
    config = build_config(preset)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(_DTYPES[dtype])  # same values whatever the dtype, rounded
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    _add_legacy_config_keys(out_dir / "config.json", config)
    tokenizer = train_tokenizer(config.vocab_size, seed, spec.num_corpus_words,
                                spec.num_corpus_sentences)
    save_tokenizer(tokenizer, out_dir, config.max_position_embeddings)
    return sum(p.numel() for p in model.parameters())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
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

"""The engine's command-line flags, one per config field with the field's default: shared by
`pagedserve serve|generate` and the offline benchmarks."""

from __future__ import annotations

import argparse
import dataclasses

from server.config import (
    ATTENTION_BACKENDS,
    CPU_GEMMS,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEVICES,
    DTYPES,
    QUANTIZATIONS,
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
)

# The config fields `add_engine_flags` makes flags of (each flag's dest is the field's name).
ENGINE_FLAG_FIELDS = ("dtype", "device", "attention_backend", "compiled_decode", "quantization",
                      "cpu_gemm",
                      "max_model_len", "block_size", "kv_cache_memory", "num_blocks",
                      "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                      "long_prefill_token_threshold")


def default_of(config_class: type, name: str) -> object:
    """A config field's dataclass default: every flag takes its default from here."""
    field = next(f for f in dataclasses.fields(config_class) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{config_class.__name__}.{name} has no default")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per engine config field (server/config.py)."""
    parser.add_argument("model", nargs="?", default=default_of(ModelConfig, "model"),
                        help="Hugging Face model directory, or a GGUF file (default: the bundled "
                             "stories260k)")
    parser.add_argument("--seed", type=int, default=default_of(ModelConfig, "seed"),
                        help="seed of the sampler for requests without their own seed")
    add_engine_flags(parser)


def add_engine_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The engine flags other than the model and the sampler seed, which the offline benchmarks
    take differently (--model; --seed seeds their prompts)."""
    parser.add_argument("--dtype", default=default_of(ModelConfig, "dtype"), choices=DTYPES,
                        help="weight and activation dtype; auto takes config.json's")
    parser.add_argument("--device", default=default_of(ModelConfig, "device"), choices=DEVICES)
    parser.add_argument("--attention-backend", default=default_of(ModelConfig, "attention_backend"),
                        choices=ATTENTION_BACKENDS,
                        help="attention kernels: auto is Triton on CUDA and elsewhere cpu (the "
                             "torch path with a compiled fp32 decode kernel, built on first use "
                             "with the C++ compiler) or, without a compiler, torch; torch "
                             "runs torch ops only, no compiled CPU kernel")
    parser.add_argument("--compiled-decode", action=argparse.BooleanOptionalAction,
                        default=default_of(ModelConfig, "compiled_decode"),
                        help="run decode-only steps of 1-64 sequences in one compiled CPU "
                             "kernel call (fp32 Llama-family models)")
    parser.add_argument("--quantization", default=default_of(ModelConfig, "quantization"),
                        choices=QUANTIZATIONS,
                        help="weight format of the linear layers: none the checkpoint's (a "
                             "GGUF file's, a GPTQ or AWQ checkpoint's quantized blocks stay "
                             "blocks: gguf, gptq, awq), int8 8-bit blocks of 32 values "
                             "quantized at load")
    parser.add_argument("--cpu-gemm", default=default_of(ModelConfig, "cpu_gemm"),
                        choices=CPU_GEMMS,
                        help="GEMM of the linear layers on CPU: auto times the compiled "
                             "tiles (own), oneDNN, MKL and plain torch per weight shape and "
                             "row count on this machine at start-up (cached per CPU) and "
                             "takes the fastest; a name forces it")
    parser.add_argument("--max-model-len", type=int,
                        default=default_of(ModelConfig, "max_model_len"),
                        help="context length cap (default: the model's)")
    parser.add_argument("--block-size", type=int, default=default_of(CacheConfig, "block_size"),
                        help="tokens per KV-cache block")
    parser.add_argument("--kv-cache-memory", type=int,
                        default=default_of(CacheConfig, "kv_cache_memory"),
                        help="bytes of KV cache (default: 1 GiB on CPU, 85%% of free memory "
                             "on CUDA)")
    parser.add_argument("--num-blocks", type=int, default=default_of(CacheConfig, "num_blocks"),
                        help="KV-cache blocks; overrides --kv-cache-memory")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=default_of(CacheConfig, "enable_prefix_caching"),
                        help="reuse the KV blocks of shared prompt prefixes")
    parser.add_argument("--max-num-seqs", type=int,
                        default=default_of(SchedulerConfig, "max_num_seqs"),
                        help="most requests running at once")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=default_of(SchedulerConfig, "max_num_batched_tokens"),
                        help="token budget of one engine step (default: "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cpu']} on CPU, "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']} on CUDA)")
    parser.add_argument("--long-prefill-token-threshold", type=int,
                        default=default_of(SchedulerConfig, "long_prefill_token_threshold"),
                        help="largest prefill chunk one request may take in a step (0: no cap "
                             "beyond the step's token budget)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, seed=args.seed, **engine_flag_kwargs(args))


def engine_flag_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments `add_engine_flags` parsed."""
    return {name: getattr(args, name) for name in ENGINE_FLAG_FIELDS}

"""Frozen, validated configuration, built once at start-up and never mutated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from server.assets import BUNDLED_MODEL_DIR

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI's and the engine process's

# The allowed values of the config fields that take one of a list: the validation below and the
# CLI's `choices` both read these.
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
ENGINE_MODES = ("thread", "process")
TOOL_CALL_PARSERS = ("auto", "none", "hermes", "llama3_json", "mistral")
CPU_GEMMS = ("auto", "own", "onednn", "mkl", "torch")  # server/models/layers/gemm_choice.py
QUANTIZATIONS = ("none", "int8", "gguf", "gptq", "awq")  # server/models/layers/linear_methods.py
LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = str(BUNDLED_MODEL_DIR)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    # None: the model's own context length (config.json's max_position_embeddings).
    max_model_len: int | None = None
    # Attention kernels: "auto" (Triton on CUDA; elsewhere "cpu" where its compiled kernel builds,
    # else "torch"), "triton", "cpu" (torch path + compiled fp32 decode kernel) or "torch".
    attention_backend: str = "auto"
    # Decode-only steps of few sequences in one compiled CPU kernel call (fp32, where it builds).
    compiled_decode: bool = True
    # The linear layers' weight format (a LinearMethod): "none" the checkpoint's own (a GGUF
    # file's, a GPTQ or AWQ checkpoint's quantized blocks stay blocks: "gguf", "gptq", "awq"),
    # "int8" 8-bit blocks quantized at load.
    quantization: str = "none"
    # Which CPU GEMM runs each row count: "auto" measures them on this machine; a kind forces it.
    cpu_gemm: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("cpu_gemm", self.cpu_gemm, CPU_GEMMS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Bytes of K/V cache across all layers. None: 1 GiB on CPU.
    kv_cache_memory: int | None = None
    # KV-cache blocks; set, it overrides kv_cache_memory.
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


# The token budget of a step where none is given, by device type. CPU: a 2048-token step of
# prompts takes ~1.7 s of 2 cores, which every request arriving meanwhile waits out; 512 cut the
# median TTFT at concurrency 32 to ~0.44x for 0.95-1.06x the output tok/s (docs/performance.md).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: DEFAULT_MAX_NUM_BATCHED_TOKENS's
    # Largest prefill chunk one request may take in a step (0: no cap beyond the budget).
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with its token budget set: the device's default where none was given."""
        if self.max_num_batched_tokens is not None:
            return self
        return dataclasses.replace(self, max_num_batched_tokens=DEFAULT_MAX_NUM_BATCHED_TOKENS.get(
            device_type, DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"]))


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: object) -> EngineConfig:
        """Build from flat keyword arguments (the offline `LLM` and the CLI share these names)."""
        groups: dict[type, dict[str, object]] = {ModelConfig: {}, CacheConfig: {},
                                                 SchedulerConfig: {}}
        fields = {c: {f.name for f in dataclasses.fields(c)} for c in groups}
        for key, value in kwargs.items():
            owner = next((c for c in groups if key in fields[c]), None)
            if owner is None:
                known = sorted(set().union(*fields.values()) - {"model"})
                raise TypeError(f"unknown engine argument {key!r}; known: {', '.join(known)}")
            groups[owner][key] = value
        if model is not None:
            groups[ModelConfig]["model"] = str(model)
        return cls(
            model=ModelConfig(**groups[ModelConfig]),  # type: ignore[arg-type]
            cache=CacheConfig(**groups[CacheConfig]),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(**groups[SchedulerConfig]),  # type: ignore[arg-type]
        )


def describe(config: EngineConfig) -> str:
    """Every field as name=value, for the start-up log."""
    return ", ".join(f"{f.name}={getattr(group, f.name)!r}"
                     for group in (config.model, config.cache, config.scheduler)
                     for f in dataclasses.fields(group))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the model directory's name
    api_key: str | None = None  # guards every route but /health (and /metrics, if public)
    public_metrics: bool = False  # /metrics answers without the API key (for a scraper)
    debug_endpoints: bool = False  # GET /debug/engine: the engine's consistency check
    max_queued_requests: int = 1024
    allowed_origins: tuple[str, ...] = ()
    max_request_body_bytes: int = 16 << 20
    log_level: str = "info"  # one of LOG_LEVELS
    shutdown_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    chat_template: str | None = None  # Jinja text; None: the tokenizer's own
    # How tool calls are read from the output: one of TOOL_CALL_PARSERS ("auto": the format
    # the chat template names, when it names exactly one).
    tool_call_parser: str = "auto"
    engine_mode: str = "thread"  # where the engine loop runs: one of ENGINE_MODES

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be >= 1024")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("engine_mode", self.engine_mode, ENGINE_MODES)
        _check_choice("tool_call_parser", self.tool_call_parser, TOOL_CALL_PARSERS)

"""What comes out of the engine: per-step outputs (token ids, logprobs, finish) and stats, which
the engine produces and the API and the offline `LLM` read, and the offline `LLM`'s results
(vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SampleResult:
    """The model runner's answer for one request that sampled this step."""

    token_id: int
    logprob: float | None = None  # the sampled token's logprob, when logprobs were asked for
    top_logprobs: dict[int, float] | None = None  # top-N token id -> logprob
    rank: int | None = None  # its rank in the distribution (1: the most likely); prompt tokens


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    index: int = 0  # which of the request's n completions
    new_logprobs: list[SampleResult] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended the request, if any
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling, on the first token
    # On the first output of a request with prompt_logprobs: one entry per prompt token after
    # the first (the first has no context to be predicted from).
    prompt_logprobs: list[SampleResult] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int



@dataclass(slots=True)
class RunnerOutput:
    """What one forward pass gives the scheduler."""

    samples: dict[str, SampleResult] = field(default_factory=dict)  # request id -> its token
    # request id -> the logprobs of the prompt tokens this step's chunk predicted, in order
    prompt_logprobs: dict[str, list[SampleResult]] = field(default_factory=dict)
    # Requests whose structured-outputs grammar ended with this step's token: they stop.
    grammar_ended: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class EngineCheck:
    """The engine's consistency, checked between two steps: what it holds, and the first
    broken invariant of the KV pool and the request tables (None when all hold)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    problem: str | None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} for the sampled token and the top-N.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # With prompt_logprobs: None for the first prompt token, then token id -> logprob for each
    # later one (its own and the top-N), as vLLM gives them.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


class StepError(RuntimeError):
    """A step failed (a bug, or a fault a test injected): only `request_ids`, the requests that
    step ran, are lost; the engine goes on with the others."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids

"""Per-request sampling parameters (vLLM-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # most top-N logprobs per token (OpenAI's chat limit)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # what a torch generator's seed and a tensor hold


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's `structured_outputs`): exactly one of a JSON schema (as
    canonical JSON text), any JSON object, a regex, a choice of literal strings, a grammar
    (EBNF, or Lark when it has no `::=`), or an xgrammar structural tag (its JSON text: tool
    calls in a model's own format). Plain data, so it is the grammar cache's key."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    any_whitespace: bool = True  # JSON: whitespace anywhere JSON allows it (else compact)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                       else [])
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of json, json_object, regex, "
                             f"choice, grammar and structural_tag, got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured outputs' choice must not be empty")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled token (0: only the sampled one)
    # top-N logprobs at every prompt position after the first (0: only the prompt's own token)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{name} {message}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        if self.top_k == -1:
            self.top_k = 0
        check(isinstance(self.top_k, int) and 0 <= self.top_k <= INT64_MAX, "top_k",
              "must be -1, 0 or in [1, 2**63)")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.min_tokens >= 0, "min_tokens", "must be >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
              f"must be in [0, {MAX_LOGPROBS}]")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
              "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            for bias in self.logit_bias.values():
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        check(self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed",
              "must fit in 64 bits")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

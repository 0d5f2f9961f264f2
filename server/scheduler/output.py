"""What the scheduler hands the model runner, and what comes back out of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request  # read-only for the model runner
    num_computed_tokens: int  # before this step
    num_scheduled_tokens: int
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so its sample is kept."""
        return self.num_computed_tokens + self.num_scheduled_tokens >= self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    # Requests that left the engine since the previous step (per-request runner state can go).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampleResult:
    """The model runner's answer for one request that sampled this step."""

    token_id: int
    logprob: float | None = None  # the sampled token's logprob, when logprobs were asked for
    top_logprobs: dict[int, float] | None = None  # top-N token id -> logprob


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""What the scheduler hands the model runner, and what comes back out of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.request import Request


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

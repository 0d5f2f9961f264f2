"""What the scheduler hands the model runner: ids, token ids and block ids, never live requests.

The runner keeps its own state per request: it is created from `NewRequestData` when a request is
scheduled from the waiting queue (for the first time, or again after a preemption), extended by
each scheduled request's `new_block_ids` and by the runner's own samples, and dropped for the ids
in `finished_req_ids` and `preempted_req_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequestData:
    token_ids: list[int]  # the prompt, then the output so far (a request resumed after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    num_computed_tokens: int  # before this step
    num_scheduled_tokens: int
    new_block_ids: list[int]  # appended to the runner's block table (all of it for a new request)
    samples: bool  # this step reaches the request's last token, so its sample is kept
    new_request: NewRequestData | None = None  # set when the runner holds no state for it yet


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    # Requests that left the engine since the previous step (per-request runner state can go).
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted in this step: the runner drops their state; they come back as new.
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled

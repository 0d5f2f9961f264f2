"""A request as the scheduler and KV-cache manager see it: token ids and progress counters."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence

from server.sampling_params import SamplingParams


def checked_max_tokens(prompt_token_ids: Sequence[int], params: SamplingParams,
                       vocab_size: int, max_model_len: int) -> int:
    """The engine's check of one completion request (n > 1 is fanned out by the front end,
    engine/fan_out.py): raises ValueError for one it cannot serve, else returns its effective
    output cap, clipped to the room max_model_len leaves."""
    if params.n != 1:
        raise ValueError(f"the engine core runs one completion per request, got "
                         f"n={params.n}; fan out with server.engine.fan_out")
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValueError("the prompt must contain at least one token")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    if num_prompt >= max_model_len:
        raise ValueError(f"the prompt has {num_prompt} tokens; max_model_len="
                         f"{max_model_len} leaves no room for output")
    room = max_model_len - num_prompt
    return min(params.max_tokens or room, room)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "eos_token_ids",
                 "all_token_ids", "num_computed_tokens", "num_cached_tokens", "status",
                 "block_hashes", "arrival_time", "num_preemptions",
                 "max_tokens", "stop_reason", "first_scheduled_time")

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        max_tokens: int | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)
        # Effective cap on output tokens, already clipped to max_model_len by the engine.
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set once, when first scheduled
        self.status = RequestStatus.WAITING
        # Hashes of the full blocks of all_token_ids, a prefix of them: the KV-cache manager
        # extends the list when it needs the hashes.
        self.block_hashes: list[bytes] = []
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_preemptions = 0
        self.stop_reason: int | None = None
        self.first_scheduled_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")

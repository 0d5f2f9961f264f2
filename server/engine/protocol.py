"""The engine contract: all that the API knows of an engine. The real clients
(async_client.py) and the fake engine (fake.py) implement it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.outputs import EngineCheck, EngineCoreOutput, EngineStats
from server.sampling_params import SamplingParams


class EngineNotReadyError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    """The engine loop is gone: every open stream fails with this (a 503), and so would any
    new request."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (a step that ran it raised) and goes on (a 500)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine tells the API once its model is loaded."""

    model_dir: Path  # where the tokenizer is read from
    max_model_len: int
    vocab_size: int


# Called on the event loop's thread after each engine step (or batch of applied commands).
StepListener = Callable[[list[EngineCoreOutput], EngineStats], None]


class RequestStream(Protocol):
    """One request's outputs, until each of its n completions finished. Closing it early aborts
    whatever still runs."""

    request_id: str
    n: int

    def finish_choice(self, index: int) -> None:
        """Stop completion `index` now (a stop string matched on the API side)."""

    def close(self) -> None:
        """Stop listening and abort what still runs. Idempotent."""

    def __aiter__(self) -> AsyncIterator[EngineCoreOutput]: ...


class EngineClient(Protocol):
    @property
    def model_info(self) -> ModelInfo | None:
        """None until the model is loaded."""

    @property
    def alive(self) -> bool:
        """Loaded and still running: requests can be submitted."""

    @property
    def error(self) -> BaseException | None:
        """Why the engine never came up, or died."""

    @property
    def num_waiting(self) -> int:
        """Requests not yet running, including those on their way into the engine."""

    def stats(self) -> EngineStats | None: ...

    def start(self, loop: asyncio.AbstractEventLoop,
              step_listener: StepListener | None = None) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> RequestStream:
        """Submit a request (raises EngineNotReadyError when not alive); iterate the returned
        stream for its outputs."""

    def abort(self, request_id: str) -> None:
        """Abort one engine request: a completion (see fan_out.py), or a whole request of n=1;
        streams abort their own requests when closed."""

    async def check(self) -> EngineCheck:
        """Run the engine's consistency check between two steps (the debug endpoint)."""

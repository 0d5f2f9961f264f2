"""The engine side of the async client: apply adds and aborts, step, report. The same loop runs
in an engine thread or in an engine process; only how commands arrive and results leave differs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.protocol import ModelInfo
from server.outputs import EngineCheck, EngineCoreOutput, EngineStats, StepError
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class CoreLike(Protocol):
    """What the loop drives: EngineCore, or the fake engine's core."""

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams,
                    arrival_time: float | None = None) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[EngineCoreOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def unfinished_request_ids(self) -> list[str]: ...

    def stats(self) -> EngineStats: ...

    def model_info(self) -> ModelInfo: ...

    def check(self) -> EngineCheck: ...

    def take_failed(self) -> list[tuple[str, str]]: ...


@dataclass(slots=True)
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(slots=True)
class AbortCommand:
    request_id: str


@dataclass(slots=True)
class CheckCommand:
    """Run the core's consistency check between two steps; the next report carries it."""


@dataclass(slots=True)
class StopCommand:
    pass


Command = AddCommand | AbortCommand | CheckCommand | StopCommand


@dataclass(slots=True)
class StepReport:
    """What the engine side sends back after applying commands and/or stepping."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    step_time: float
    num_adds_applied: int  # running total, so the client knows how many adds are still queued
    failed: list[tuple[str, str]] = field(default_factory=list)  # (request_id, message)
    crashed: list[tuple[str, str]] = field(default_factory=list)  # requests failed by a bug
    checks: list[EngineCheck] = field(default_factory=list)  # one per CheckCommand, in order


def run_engine_loop(engine: CoreLike, receive: Callable[[bool], list[Command]],
                    emit: Callable[[StepReport], None]) -> None:
    """`receive(block)` returns the commands that arrived (waiting for one when `block`);
    `emit` ships a report. Returns after a StopCommand."""
    num_applied = 0
    while True:
        commands = receive(not engine.has_unfinished_requests())
        failed: list[tuple[str, str]] = []
        checks: list[EngineCheck] = []
        for command in commands:
            if isinstance(command, StopCommand):
                return
            if isinstance(command, AbortCommand):
                engine.abort_request(command.request_id)
                continue
            if isinstance(command, CheckCommand):
                checks.append(engine.check())
                continue
            num_applied += 1
            try:
                engine.add_request(command.request_id, command.prompt_token_ids,
                                   command.params, arrival_time=command.arrival_time)
            except ValueError as e:
                failed.append((command.request_id, str(e)))
        if checks or (commands and not engine.has_unfinished_requests()):
            emit(StepReport([], engine.stats(), 0.0, num_applied, failed, checks=checks))
            failed = []
        if not engine.has_unfinished_requests():
            continue
        start = time.monotonic()
        crashed: list[tuple[str, str]] = []
        try:
            outputs = engine.step()
        except Exception as e:  # a bug: fail the requests it touched, keep serving the others
            logger.exception("engine step failed")
            outputs = []
            lost = (e.request_ids if isinstance(e, StepError)
                    else engine.unfinished_request_ids())  # unknown: everything in flight
            for request_id in lost:
                engine.abort_request(request_id)
                crashed.append((request_id, f"internal engine error: {e}"))
        crashed += engine.take_failed()
        emit(StepReport(outputs, engine.stats(), time.monotonic() - start, num_applied, failed,
                        crashed))

"""Drives EngineCore from its own thread for the async API: per-request asyncio queues in,
token ids out, abort on disconnect. The event loop thread never runs an engine step."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.config import EngineConfig
from server.engine.core import EngineCore, EngineStats
from server.engine.sampling_params import SamplingParams
from server.engine.tokenizer import load_tokenizer
from server.scheduler.output import EngineCoreOutput

logger = logging.getLogger(__name__)


class EngineNotReadyError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


StepListener = Callable[[list[EngineCoreOutput], EngineStats, float], None]


class AsyncEngine:
    """Owns the engine thread. Construct, then `start()`; the model loads in that thread, and
    `ready` turns true once it can serve (`error` holds why it never will)."""

    def __init__(self, config: EngineConfig, step_listener: StepListener | None = None) -> None:
        self.config = config
        self.engine: EngineCore | None = None
        self.tokenizer = None
        self.ready = False
        self.error: BaseException | None = None
        self._step_listener = step_listener
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._commands: deque[_Add | tuple[str, int | None]] = deque()  # a tuple aborts
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stats: EngineStats | None = None
        # Each counter is written by one thread only; their difference is the adds in flight.
        self._num_adds_submitted = 0
        self._num_adds_applied = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.ready and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None
        return self.engine.max_model_len

    def stats(self) -> EngineStats | None:
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Requests not yet running, including those not yet handed to the engine."""
        stats = self._stats
        pending = self._num_adds_submitted - self._num_adds_applied
        return (stats.num_waiting if stats else 0) + pending

    # ------------------------------------------------------------------ API side (event loop)
    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> RequestStream:
        """Submit a request; iterate the returned stream for its outputs."""
        if not self.alive:
            raise EngineNotReadyError("the engine is not ready")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._num_adds_submitted += 1
        self._commands.append(_Add(request_id, prompt_token_ids, params, time.monotonic()))
        self._wakeup.set()
        return RequestStream(self, request_id, params.n, queue)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self._commands.append((request_id, index))
        self._wakeup.set()

    def _release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item: EngineCoreOutput | BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _post(self, items: list[tuple[str, EngineCoreOutput | BaseException]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: [self._deliver(r, i) for r, i in items])

    def _apply_commands(self, engine: EngineCore) -> None:
        failed: list[tuple[str, EngineCoreOutput | BaseException]] = []
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, tuple):
                engine.abort_request(*command)
                continue
            self._num_adds_applied += 1
            try:
                engine.add_request(command.request_id, command.prompt_token_ids,
                                   command.params, arrival_time=command.arrival_time)
            except ValueError as e:
                failed.append((command.request_id, e))
        self._post(failed)

    def _run(self) -> None:
        try:
            self.engine = EngineCore(self.config)
            self.tokenizer = load_tokenizer(self.engine.model_dir)
            self._stats = self.engine.stats()
            self.ready = True
        except BaseException as e:  # reported through `error` and /health
            logger.error("engine start-up failed: %s", e)
            self.error = e
            return
        engine = self.engine
        while not self._stopping:
            if self._commands:
                self._apply_commands(engine)
                self._publish_stats(engine, [], 0.0)
            if not engine.has_unfinished_requests():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            start = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving others
                logger.exception("engine step failed")
                self._fail_all(engine, e)
                continue
            self._publish_stats(engine, outputs, time.monotonic() - start)
            self._post([(o.request_id, o) for o in outputs])

    def _publish_stats(self, engine: EngineCore, outputs: list[EngineCoreOutput],
                       step_time: float) -> None:
        self._stats = engine.stats()
        if self._step_listener is not None:
            self._step_listener(outputs, self._stats, step_time)

    def _fail_all(self, engine: EngineCore, error: Exception) -> None:
        request_ids = engine.unfinished_request_ids()
        for request_id in request_ids:
            engine.abort_request(request_id)
        failure = EngineDeadError(f"internal engine error: {error}")
        self._post([(r, failure) for r in request_ids])


class RequestStream:
    """One request's outputs, until each of its n completions finished (or was finished early
    by the API with `finish_choice`). Closing it early aborts whatever still runs."""

    def __init__(self, engine: AsyncEngine, request_id: str, n: int,
                 queue: asyncio.Queue) -> None:
        self._engine, self.request_id, self.n, self._queue = engine, request_id, n, queue
        self._finished: set[int] = set()

    def finish_choice(self, index: int) -> None:
        """Stop completion `index` now (a stop string matched on the API side)."""
        if index not in self._finished:
            self._finished.add(index)
            self._engine.abort(self.request_id, index)

    async def __aiter__(self) -> AsyncIterator[EngineCoreOutput]:
        try:
            while len(self._finished) < self.n:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.index in self._finished:
                    continue  # already ended on the API side
                if item.finished:
                    self._finished.add(item.index)
                yield item
        finally:
            self._engine._release(self.request_id)
            if len(self._finished) < self.n:
                self._engine.abort(self.request_id)

"""The engine clients of the async API: per-request asyncio queues, token ids in and out, abort
on disconnect. The engine loop never runs on the event loop's thread: `ThreadEngineClient` runs
it in a thread of this process, `ProcessEngineClient` in a process of its own. Both implement
`EngineClient` (protocol.py)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from server.config import ENGINE_MODES, LOG_FORMAT, EngineConfig
from server.engine.engine_loop import (
    AbortCommand,
    AddCommand,
    CheckCommand,
    Command,
    CoreLike,
    StepReport,
    StopCommand,
    run_engine_loop,
)
from server.engine.fan_out import fan_out
from server.engine.protocol import (
    EngineDeadError,
    EngineNotReadyError,
    ModelInfo,
    RequestFailedError,
    StepListener,
)
from server.outputs import EngineCheck, EngineCoreOutput, EngineStats
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = tuple[str, EngineCoreOutput | BaseException]


class AsyncEngineClient:
    """The API side. Subclasses start the engine loop somewhere and feed `_on_report`;
    `model_info` is set once the model is loaded (`error` holds why it never will)."""

    def __init__(self) -> None:
        self.model_info: ModelInfo | None = None
        self.error: BaseException | None = None
        self._step_listener: StepListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # engine request id (one per completion) -> (its stream's queue, completion index)
        self._routes: dict[str, tuple[asyncio.Queue, int]] = {}
        self._stats: EngineStats | None = None
        # Both counted on the event loop's thread: their difference is the adds still on their
        # way into the engine.
        self._num_adds_submitted = 0
        self._num_adds_applied = 0
        self._checks: deque[asyncio.Future[EngineCheck]] = deque()  # answered in order

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop,
              step_listener: StepListener | None = None) -> None:
        self._loop = loop
        self._step_listener = step_listener
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _submit(self, command: Command) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def stats(self) -> EngineStats | None:
        return self._stats

    @property
    def num_waiting(self) -> int:
        stats = self._stats
        pending = self._num_adds_submitted - self._num_adds_applied
        return (stats.num_waiting if stats else 0) + pending

    # ------------------------------------------------------------------ event loop side
    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> RequestStream:
        """Fan the request out into one engine request per completion (fan_out.py); the
        returned stream merges their outputs."""
        if not self.alive:
            raise EngineNotReadyError("the engine is not ready")
        children = fan_out(request_id, params)
        if any(child_id in self._routes for child_id, _ in children):
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        for index, (child_id, child_params) in enumerate(children):
            self._routes[child_id] = (queue, index)
            self._num_adds_submitted += 1
            self._submit(AddCommand(child_id, prompt_token_ids, child_params, now))
        return RequestStream(self, request_id, [child_id for child_id, _ in children], queue)

    def abort(self, request_id: str) -> None:
        """Abort one engine request (one completion)."""
        self._submit(AbortCommand(request_id))

    async def check(self) -> EngineCheck:
        """The engine's consistency check, run between two steps."""
        if not self.alive:
            raise EngineNotReadyError("the engine is not ready")
        answer: asyncio.Future[EngineCheck] = asyncio.get_running_loop().create_future()
        self._checks.append(answer)
        self._submit(CheckCommand())
        return await answer

    def _died(self, error: BaseException) -> None:
        """From the engine side: the loop is gone for good; every open stream fails now."""
        self.error = error
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all,
                                            EngineDeadError(f"the engine died: {error}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        for queue, index in list(self._routes.values()):
            queue.put_nowait((index, error))
        while self._checks:
            answer = self._checks.popleft()
            if not answer.done():
                answer.set_exception(error)

    def _release(self, child_ids: list[str]) -> None:
        for child_id in child_ids:
            self._routes.pop(child_id, None)

    def _apply_report(self, report: StepReport, items: list[_Item]) -> None:
        self._stats = report.stats
        self._num_adds_applied = report.num_adds_applied
        if self._step_listener is not None:
            self._step_listener(report.outputs, report.stats)
        for check in report.checks:
            answer = self._checks.popleft()
            if not answer.done():  # its caller may have gone
                answer.set_result(check)
        for request_id, item in items:
            route = self._routes.get(request_id)
            if route is None:
                continue  # its stream was closed
            queue, index = route
            if isinstance(item, EngineCoreOutput):
                item.index = index
            queue.put_nowait((index, item))

    # ------------------------------------------------------------------ engine side
    def _on_report(self, report: StepReport) -> None:
        """Called from the engine thread (or the process's reader thread): hands the report to
        the event loop."""
        items: list[_Item] = [(o.request_id, o) for o in report.outputs]
        items += [(r, ValueError(m)) for r, m in report.failed]
        items += [(r, RequestFailedError(m)) for r, m in report.crashed]
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._apply_report, report, items)


_WAKE = object()  # put in a stream's queue when a choice ends on the API side


class RequestStream:
    """One request's outputs, until each of its n completions finished (or was finished early
    by the API with `finish_choice`). Closing it early aborts whatever still runs."""

    def __init__(self, client: AsyncEngineClient, request_id: str, child_ids: list[str],
                 queue: asyncio.Queue) -> None:
        self._client, self.request_id, self._queue = client, request_id, queue
        self._child_ids = child_ids
        self.n = len(child_ids)
        self._finished: set[int] = set()
        self._closed = False

    def finish_choice(self, index: int) -> None:
        """Stop completion `index` now (a stop string matched on the API side)."""
        if index not in self._finished:
            self._finished.add(index)
            self._client.abort(self._child_ids[index])
            # A reader already waiting for the next output must see that none may come.
            self._queue.put_nowait((index, _WAKE))

    def close(self) -> None:
        """Stop listening; abort whatever still runs. Idempotent, and safe for a stream whose
        outputs were never read (a client that left before its response started)."""
        if self._closed:
            return
        self._closed = True
        self._client._release(self._child_ids)
        for index, child_id in enumerate(self._child_ids):
            if index not in self._finished:
                self._client.abort(child_id)

    async def __aiter__(self) -> AsyncIterator[EngineCoreOutput]:
        try:
            while len(self._finished) < self.n:
                index, item = await self._queue.get()
                if item is _WAKE:
                    continue
                if isinstance(item, BaseException):
                    raise item
                if index in self._finished:
                    continue  # already ended on the API side
                if item.finished:
                    self._finished.add(index)
                yield item
        finally:
            self.close()


class ThreadEngineClient(AsyncEngineClient):
    """The engine loop in a thread of this process, over the core `make_core` builds there."""

    def __init__(self, make_core: Callable[[], CoreLike]) -> None:
        super().__init__()
        self._make_core = make_core
        self._commands: deque[Command] = deque()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._submit(StopCommand())
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.model_info is not None and self._thread.is_alive()

    def _submit(self, command: Command) -> None:
        self._commands.append(command)
        self._wakeup.set()

    def _receive(self, block: bool) -> list[Command]:
        if block and not self._commands:
            self._wakeup.wait()
        self._wakeup.clear()
        commands = []
        while self._commands:
            commands.append(self._commands.popleft())
        return commands

    def _run(self) -> None:
        try:
            engine = self._make_core()
            self._stats = engine.stats()
            self.model_info = engine.model_info()
        except BaseException as e:  # reported through `error` and /health
            logger.error("engine start-up failed: %s", e)
            self.error = e
            return
        try:
            run_engine_loop(engine, self._receive, self._on_report)
        except BaseException as e:  # the loop itself broke: /health turns 503
            logger.exception("the engine loop died")
            self._died(e)


def _engine_process_main(config: EngineConfig, conn, log_level: int) -> None:
    """Entry point of the engine process: load, report, then serve commands over `conn`.
    Logs at the parent's level (a spawned process starts with logging unconfigured)."""
    import signal

    from server.engine.core import EngineCore

    # The server decides when the engine stops (StopCommand, or the pipe closing): a Ctrl-C to
    # the process group must not kill the engine under requests the server is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        engine = EngineCore(config)
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", (engine.model_info(), engine.stats())))

    def receive(block: bool) -> list[Command]:
        commands = []
        if block:
            commands.extend(conn.recv())
        while conn.poll():
            commands.extend(conn.recv())
        return commands

    run_engine_loop(engine, receive, lambda report: conn.send(("report", report)))


class ProcessEngineClient(AsyncEngineClient):
    """The engine loop in a process of its own; commands and reports travel over a pipe."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_engine_process_main,
                                        args=(config, child_conn, logging.getLogger().level),
                                        name="pagedserve-engine", daemon=True)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._send_lock = threading.Lock()
        self._stopping = False

    def _start(self) -> None:
        self._process.start()
        self._reader.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._process.is_alive():
            try:
                self._submit(StopCommand())
            except OSError:
                pass
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()

    @property
    def alive(self) -> bool:
        return self.model_info is not None and self._process.is_alive()

    def _submit(self, command: Command) -> None:
        with self._send_lock:
            self._conn.send([command])

    def _read(self) -> None:
        try:
            kind, payload = self._conn.recv()
            if kind == "error":
                raise RuntimeError(payload)
            self.model_info, self._stats = payload
            while True:
                kind, report = self._conn.recv()
                self._on_report(report)
        except EOFError:
            if not self._stopping:
                logger.error("the engine process exited")
                self._died(EngineDeadError("the engine process exited"))
        except BaseException as e:  # reported through `error` and /health
            if self.model_info is None:
                logger.error("engine start-up failed: %s", e)
                self.error = e
            else:
                logger.error("the engine process failed: %s", e)
                self._died(e)


def make_engine_client(config: EngineConfig, mode: str = "thread") -> AsyncEngineClient:
    """The real engine, its loop in a thread or a process of its own."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"engine mode must be one of {', '.join(ENGINE_MODES)}, got {mode!r}")
    if mode == "process":
        return ProcessEngineClient(config)

    def make_core() -> CoreLike:
        from server.engine.core import EngineCore

        return EngineCore(config)

    return ThreadEngineClient(make_core)

"""A scriptable fake engine for API tests: the real client and engine loop over a core with no
model and no torch. Its tokens are deterministic (by default the prompt, repeated), and tests
decide how long a request lasts: `pause()` holds every step from the next one on until
`resume()`, `allow(k)` lets k more steps run first, `step_delay` sleeps in each step, and
`fail_when` makes a step raise. Tests wait on its state (`wait_for`), never on the clock.
Structured-outputs constraints are recorded (`params_seen`), not enforced: its text is the
test's script."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.assets import BUNDLED_MODEL_DIR
from server.engine.async_client import ThreadEngineClient
from server.engine.protocol import ModelInfo
from server.outputs import EngineCheck, EngineCoreOutput, EngineStats, SampleResult, StepError
from server.request import checked_max_tokens
from server.sampling_params import SamplingParams

# (prompt token ids, number of tokens generated so far) -> the next token id
TokenFn = Callable[[Sequence[int], int], int]


def repeat_prompt(prompt_token_ids: Sequence[int], num_generated: int) -> int:
    return prompt_token_ids[num_generated % len(prompt_token_ids)]


@dataclass(slots=True)
class _Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)


class FakeEngineCore:
    """Stands in for EngineCore: same calls, same validation, no model."""

    def __init__(self, model_dir: Path = BUNDLED_MODEL_DIR, max_model_len: int = 512,
                 vocab_size: int = 512, max_num_seqs: int = 256,
                 eos_token_ids: Sequence[int] = (), token_fn: TokenFn = repeat_prompt,
                 step_delay: float = 0.0,
                 fail_when: Callable[[Sequence[int]], bool] | None = None) -> None:
        self.model_dir, self.max_model_len, self.vocab_size = model_dir, max_model_len, vocab_size
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = frozenset(eos_token_ids)
        self.token_fn, self.step_delay, self.fail_when = token_fn, step_delay, fail_when
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.num_steps = 0
        self.added: list[str] = []
        self.params_seen: list[SamplingParams] = []  # of every request added, in order
        self.aborted: list[str] = []
        self._changed = threading.Condition()
        self._steps_allowed: int | None = None  # None: no limit
        self._poked = False

    # ------------------------------------------------------------------ test controls
    def pause(self) -> None:
        """Hold every step from the next one on until `resume()` or `allow()`."""
        with self._changed:
            self._steps_allowed = 0

    def allow(self, num_steps: int) -> None:
        """Let `num_steps` more steps run, then hold again."""
        with self._changed:
            self._steps_allowed = (self._steps_allowed or 0) + num_steps
            self._changed.notify_all()

    def resume(self) -> None:
        with self._changed:
            self._steps_allowed = None
            self._changed.notify_all()

    def poke(self) -> None:
        """A command arrived: a held step returns (empty) so that the loop applies it."""
        with self._changed:
            self._poked = True
            self._changed.notify_all()

    def _wait_for_go(self) -> bool:
        """Whether this step may run; False when a poke ended the wait first."""
        with self._changed:
            self._changed.wait_for(lambda: self._steps_allowed != 0 or self._poked)
            self._poked = False
            if self._steps_allowed == 0:
                return False
            if self._steps_allowed is not None:
                self._steps_allowed -= 1
            return True

    def wait_for(self, predicate: Callable[[FakeEngineCore], bool],
                 timeout: float = 30.0) -> None:
        """Block until `predicate(self)` holds after some change of state (a safety timeout
        only: the predicate is expected to come true)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError("the fake engine never reached the awaited state")

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ the core's calls
    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_dir, self.max_model_len, self.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, arrival_time: float | None = None) -> None:
        max_tokens = checked_max_tokens(prompt_token_ids, sampling_params, self.vocab_size,
                                        self.max_model_len)
        if request_id in self.unfinished_request_ids():
            raise ValueError(f"request id {request_id!r} is already in the engine")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.waiting.append(_Sequence(request_id, list(prompt_token_ids), sampling_params,
                                      max_tokens, arrival))
        self.added.append(request_id)
        self.params_seen.append(sampling_params)
        self._notify()

    def abort_request(self, request_id: str) -> None:
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = [s for s in self.running if s.request_id != request_id]
        self.aborted.append(request_id)
        self._notify()

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished_request_ids(self) -> list[str]:
        return list(dict.fromkeys(s.request_id for s in (*self.running, *self.waiting)))

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_cache_usage=len(self.running) / self.max_num_seqs,
                           prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)

    def check(self) -> EngineCheck:
        """The fake holds no KV blocks; a sequence in both queues is its one invariant."""
        both = {s.request_id for s in self.waiting} & {s.request_id for s in self.running}
        return EngineCheck(len(self.running), len(self.waiting), 0, 0,
                           f"running and waiting at once: {sorted(both)}" if both else None)

    def take_failed(self) -> list[tuple[str, str]]:
        return []  # the fake fails no request on its own

    def step(self) -> list[EngineCoreOutput]:
        if not self._wait_for_go():
            return []
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        if self.fail_when is not None and any(self.fail_when(s.prompt_token_ids)
                                              for s in self.running):
            raise StepError([s.request_id for s in self.running],
                            RuntimeError("the fake engine was told to fail this step"))
        outputs = [self._advance(s) for s in self.running]
        self.running = [s for s, out in zip(self.running, outputs) if not out.finished]
        self.num_steps += 1
        self._notify()
        return outputs

    def _top(self, token_id: int, num: int) -> dict[int, float] | None:
        """The fake's top-`num` logprobs: the token itself at -1, the next ids lower."""
        return {(token_id + k) % self.vocab_size: -1.0 - k for k in range(num)} or None

    def _advance(self, seq: _Sequence) -> EngineCoreOutput:
        token_id = self.token_fn(seq.prompt_token_ids, len(seq.output_token_ids))
        seq.output_token_ids.append(token_id)
        params, num_out = seq.params, len(seq.output_token_ids)
        finish, stop_reason = None, None
        if num_out >= params.min_tokens and not params.ignore_eos \
                and token_id in self.eos_token_ids:
            finish = "stop"
        elif num_out >= params.min_tokens and token_id in params.stop_token_ids:
            finish, stop_reason = "stop", token_id
        elif num_out >= seq.max_tokens:
            finish = "length"
        logprobs = []
        if params.logprobs is not None:
            logprobs = [SampleResult(token_id, -1.0, self._top(token_id, params.logprobs))]
        prompt_logprobs = None
        if num_out == 1 and params.prompt_logprobs is not None:  # every prompt token: -1, rank 1
            prompt_logprobs = [SampleResult(t, -1.0, self._top(t, params.prompt_logprobs), 1)
                               for t in seq.prompt_token_ids[1:]]
        return EngineCoreOutput(seq.request_id, [token_id], new_logprobs=logprobs,
                                finish_reason=finish, stop_reason=stop_reason,
                                queue_time=0.0 if num_out == 1 else None,
                                prompt_logprobs=prompt_logprobs)


class FakeEngineClient(ThreadEngineClient):
    """The real thread client and engine loop over a `FakeEngineCore`."""

    def __init__(self, core: FakeEngineCore) -> None:
        super().__init__(lambda: core)
        self.core = core

    def _submit(self, command) -> None:
        super()._submit(command)
        self.core.poke()

"""The scheduler step (DESIGN.md §3): running requests first, then FCFS admission, all under
one token budget; preemption by recompute, newest first."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from server.config import SchedulerConfig
from server.kv_cache.manager import NO_COMPUTED_BLOCKS, KVCacheManager
from server.outputs import EngineCoreOutput, RunnerOutput, SampleResult
from server.request import Request, RequestStatus
from server.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 max_model_len: int) -> None:
        if config.max_num_batched_tokens is None:
            raise ValueError("SchedulerConfig.max_num_batched_tokens is unset: "
                             "use SchedulerConfig.for_device(...)")
        self.config = config
        self.token_budget: int = config.max_num_batched_tokens
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # Prompt logprobs computed so far, per request that asked, until its first output.
        self._prompt_logprobs: dict[str, list[SampleResult]] = {}

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort) requests wherever they are; their blocks are freed at once."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._prompt_logprobs.pop(request.request_id, None)
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ one step
    def _chunk(self, num_remaining: int, budget: int) -> int:
        num_new = min(num_remaining, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _preempt(self, request: Request) -> None:
        self._prompt_logprobs.pop(request.request_id, None)  # recomputed from the start
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # Running requests, oldest first; victims come off the end of the list.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            while (new_blocks := self.kv_cache.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new,
                                                 [b.block_id for b in new_blocks]))
                budget -= num_new
                index += 1
                continue
            break

        # Waiting requests in arrival order; none are admitted in a step that had to preempt.
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            # A prompt whose logprobs are wanted is computed whole: cached blocks hold no logits.
            computed = (self.kv_cache.get_computed_blocks(request)
                        if request.num_computed_tokens == 0 and not _wants_prompt_logprobs(request)
                        else NO_COMPUTED_BLOCKS)
            # allocate_slots adds the hit to the request's (zero) computed tokens itself.
            num_new = self._chunk(request.num_tokens - computed.num_tokens, budget)
            if self.kv_cache.allocate_slots(request, num_new, computed) is None:
                break
            request.num_computed_tokens = computed.num_tokens
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = computed.num_tokens
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            entry = self._scheduled(request, num_new,
                                    self.kv_cache.get_block_ids(request.request_id))
            entry.new_request = NewRequestData(list(request.all_token_ids),
                                               request.num_prompt_tokens,
                                               request.sampling_params, request.eos_token_ids)
            scheduled.append(entry)
            budget -= num_new

        finished, self._finished_req_ids = self._finished_req_ids, set()
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.token_budget - budget,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
        )

    @staticmethod
    def _scheduled(request: Request, num_new: int, new_block_ids: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        return ScheduledRequest(request.request_id, start, num_new, new_block_ids,
                                samples=start + num_new >= request.num_tokens)

    # ------------------------------------------------------------------ after the forward pass
    def update_from_output(
        self, output: SchedulerOutput, result: RunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs = []
        for entry in output.scheduled:
            request = self.requests.get(entry.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile
            chunk = result.prompt_logprobs.get(request.request_id)
            if chunk is not None:
                self._prompt_logprobs.setdefault(request.request_id, []).extend(chunk)
            if not entry.samples:
                continue  # a prefill chunk whose sample is discarded
            sample = result.samples[request.request_id]
            request.append_output_token(sample.token_id)
            prompt_logprobs = (self._prompt_logprobs.pop(request.request_id, [])
                               if request.num_output_tokens == 1
                               and request.sampling_params.prompt_logprobs is not None else None)
            status = self._check_stop(request,
                                      request.request_id in result.grammar_ended)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            outputs.append(EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[sample.token_id],
                new_logprobs=[sample] if request.sampling_params.logprobs is not None else [],
                finish_reason=status.value if status is not None else None,
                stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                queue_time=(request.first_scheduled_time - request.arrival_time
                            if request.num_output_tokens == 1
                            and request.first_scheduled_time is not None else None),
                prompt_logprobs=prompt_logprobs,
            ))
        return outputs

    def _check_stop(self, request: Request, grammar_ended: bool) -> RequestStatus | None:
        params = request.sampling_params
        token_id = request.all_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if grammar_ended:  # its constraint allows no more output (even with ignore_eos)
            return RequestStatus.FINISHED_STOPPED
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _wants_prompt_logprobs(request: Request) -> bool:
    """Asked for prompt logprobs that are not yet delivered (they go with the first output)."""
    return request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 0

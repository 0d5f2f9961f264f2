"""EngineCore: the synchronous heart. Requests in, token ids out, one `step()` at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from server.config import EngineConfig
from server.engine.protocol import ModelInfo
from server.kv_cache.manager import KVCacheManager
from server.model_runner.runner import ModelRunner
from server.models.arch_config import ArchConfig
from server.models.errors import ModelLoadError
from server.models.loader import read_generation_defaults
from server.outputs import EngineCoreOutput, EngineStats
from server.request import Request, RequestStatus
from server.sampling_params import SamplingParams
from server.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Parent:
    """A request with n > 1 completions, fanned out into one child per completion."""

    child_ids: list[str]
    held: list[Request]  # children waiting for the first child's prefill, to share its blocks


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model.model)
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"model directory {self.model_dir} does not exist")
        self.arch = ArchConfig.from_model_dir(self.model_dir)
        self.max_model_len = config.model.max_model_len or self.arch.max_position_embeddings
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len={self.max_model_len} exceeds the model's context length "
                f"(max_position_embeddings={self.arch.max_position_embeddings})")
        self.generation = read_generation_defaults(self.model_dir)
        self.runner = ModelRunner(config, self.arch, self.model_dir, self.max_model_len)
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler.for_device(self.runner.device.type),
                                   self.kv_cache, self.max_model_len)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, arrival_time: float | None = None) -> None:
        """Validate and enqueue; raises ValueError for a request that cannot be served."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab}")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens; max_model_len="
                             f"{self.max_model_len} leaves no room for output")
        room = self.max_model_len - num_prompt
        max_tokens = min(sampling_params.max_tokens or room, room)
        n = sampling_params.n
        child_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        taken = next((c for c in child_ids if c in self._child_to_parent), None)
        if taken is not None:
            raise ValueError(f"request id {taken!r} is already in the engine")
        children = []
        for index, child_id in enumerate(child_ids):
            params = sampling_params
            if n > 1 and params.seed is not None:
                params = replace(params, seed=params.seed + index)
            children.append(Request(child_id, prompt_token_ids, params,
                                    eos_token_ids=self.generation.eos_token_ids,
                                    max_tokens=max_tokens, arrival_time=arrival_time))
            self._child_to_parent[child_id] = (request_id, index)
        self._parents[request_id] = _Parent(child_ids, children[1:])
        self.scheduler.add_request(children[0])

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Abort a request (all its completions), or only its completion `index`."""
        parent = self._parents.get(request_id)
        if parent is None:
            return
        child_ids = parent.child_ids if index is None else parent.child_ids[index:index + 1]
        held = {r.request_id for r in parent.held}
        self.scheduler.finish_requests([c for c in child_ids if c not in held],
                                       RequestStatus.FINISHED_ABORTED)
        parent.held = [r for r in parent.held if r.request_id not in child_ids]
        for child_id in child_ids:
            if child_id in self._child_to_parent:
                self._child_finished(request_id, child_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._parents)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        samples = self.runner.execute(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, samples)
        self._release_held_children()
        for out in outputs:
            child_id = out.request_id
            out.request_id, out.index = self._child_to_parent[child_id]
            if out.finished:
                self._child_finished(out.request_id, child_id)
        return outputs

    def _release_held_children(self) -> None:
        for parent in self._parents.values():
            if not parent.held:
                continue
            first = parent.held[0]
            lead = self.scheduler.requests.get(parent.child_ids[0])
            if lead is None or lead.num_computed_tokens >= first.num_prompt_tokens:
                for child in parent.held:
                    self.scheduler.add_request(child)
                parent.held.clear()

    def _child_finished(self, request_id: str, child_id: str) -> None:
        self._child_to_parent.pop(child_id, None)
        parent = self._parents[request_id]
        if not any(c in self._child_to_parent for c in parent.child_ids):
            del self._parents[request_id]

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_dir, self.max_model_len, self.arch.vocab_size)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + sum(len(p.held)
                                                         for p in self._parents.values()),
            kv_cache_usage=self.kv_cache.usage(),
            prefix_cache_queries=self.kv_cache.stats.queries,
            prefix_cache_hits=self.kv_cache.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

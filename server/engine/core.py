"""EngineCore: the synchronous heart. Requests in, token ids out, one `step()` at a time."""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from server.config import EngineConfig, describe
from server.engine.protocol import ModelInfo
from server.engine.tokenizer import load_tokenizer
from server.kv_cache.manager import KVCacheManager
from server.model_runner.runner import ModelRunner, effective_config
from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf
from server.models.loader import read_generation_defaults
from server.models.registry import read_arch_config
from server.outputs import EngineCheck, EngineCoreOutput, EngineStats, StepError
from server.request import Request, RequestStatus, checked_max_tokens
from server.sampling_params import SamplingParams
from server.scheduler.scheduler import Scheduler
from server.structured.cache import GrammarCache
from server.structured.grammar import build_grammar

logger = logging.getLogger(__name__)

_COMPILE_WAIT = 0.05  # seconds an idle engine waits for a grammar before it looks for commands


def _not_a_model(path: Path) -> str:
    if not path.exists():
        return f"model {path} does not exist"
    return (f"{path} is neither a directory nor a .gguf file; give a Hugging Face model "
            f"directory (config.json, *.safetensors, tokenizer) or a GGUF file")


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model.model)
        if not self.model_dir.is_dir() and find_gguf(self.model_dir) is None:
            raise ModelLoadError(_not_a_model(self.model_dir))
        self.arch = read_arch_config(self.model_dir)
        self.max_model_len = config.model.max_model_len or self.arch.max_position_embeddings
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len={self.max_model_len} exceeds the model's context length "
                f"(max_position_embeddings={self.arch.max_position_embeddings})")
        self.generation = read_generation_defaults(self.model_dir)
        self.grammars = GrammarCache(lambda: load_tokenizer(self.model_dir),
                                     self.arch.vocab_size, self.generation.eos_token_ids)
        self.runner = ModelRunner(config, self.arch, self.model_dir, self.max_model_len,
                                  self.grammars)
        self.config = effective_config(config, self.runner, self.max_model_len)
        logger.info("engine config in effect: %s", describe(self.config))
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.kv_cache, self.max_model_len)
        # Constrained requests whose grammar is still compiling, in arrival order; they join
        # the scheduler once it is ready. Those whose compile failed wait in _failed.
        self._compiling: dict[str, tuple[Request, Future]] = {}
        self._failed: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams, arrival_time: float | None = None) -> None:
        """Validate (request.checked_max_tokens) and enqueue one completion; raises ValueError
        for a request that cannot be served."""
        max_tokens = checked_max_tokens(prompt_token_ids, sampling_params, self.arch.vocab_size,
                                        self.max_model_len)
        if request_id in self._compiling or request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        request = Request(request_id, prompt_token_ids, sampling_params,
                          eos_token_ids=self.generation.eos_token_ids,
                          max_tokens=max_tokens, arrival_time=arrival_time)
        spec = sampling_params.structured_outputs
        if spec is None or self.grammars.get(spec) is not None:
            self.scheduler.add_request(request)
        else:
            grammar = build_grammar(spec)  # a constraint that cannot be built fails here
            self._compiling[request_id] = (request, self.grammars.compile_async(spec, grammar))

    def abort_request(self, request_id: str) -> None:
        if self._compiling.pop(request_id, None) is None:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._compiling)

    def unfinished_request_ids(self) -> list[str]:
        return [*self.scheduler.requests, *self._compiling]

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, why) for the requests that left the engine without an output: their
        grammar did not compile."""
        failed, self._failed = self._failed, []
        return failed

    def _admit_compiled(self) -> None:
        if not self._compiling:
            return
        if not self.scheduler.has_unfinished_requests():  # nothing else to do meanwhile
            wait([f for _, f in self._compiling.values()], _COMPILE_WAIT, FIRST_COMPLETED)
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is None:
                self.scheduler.add_request(request)
            else:
                self._failed.append((request_id, f"the structured-outputs grammar did not "
                                                 f"compile: {error}"))

    # ------------------------------------------------------------------ one step
    def step(self) -> list[EngineCoreOutput]:
        self._admit_compiled()
        scheduler_output = self.scheduler.schedule()
        try:
            result = self.runner.execute(scheduler_output)
        except Exception as e:
            raise StepError([entry.request_id for entry in scheduler_output.scheduled],
                            e) from e
        return self.scheduler.update_from_output(scheduler_output, result)

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_dir, self.max_model_len, self.arch.vocab_size)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._compiling),
            kv_cache_usage=self.kv_cache.usage(),
            prefix_cache_queries=self.kv_cache.stats.queries,
            prefix_cache_hits=self.kv_cache.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def check(self) -> EngineCheck:
        """The pool's invariants (block_pool.py, manager.py), and no block table without a live
        request: a leak shows here."""
        try:
            self.kv_cache.check_invariants()
            strays = sorted(set(self.kv_cache.req_to_blocks) - set(self.scheduler.requests))
            problem = f"blocks held by finished requests: {strays[:5]}" if strays else None
        except AssertionError as e:
            problem = str(e) or "a KV pool invariant does not hold"
        return EngineCheck(self.scheduler.num_running, self.scheduler.num_waiting,
                           self.kv_cache.num_blocks, self.kv_cache.num_free_blocks, problem)

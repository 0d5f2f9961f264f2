"""The model runner: owns the weights and the KV cache tensors, turns a SchedulerOutput into one
flattened forward pass, and samples for the requests whose last token was scheduled."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from pagedserve_kernels import ops
from server.config import EngineConfig
from server.model_runner.cpu import (
    choose_kernels,
    compiled_decode_step,
    native_prefill_len,
    pack_for_cpu,
)
from server.model_runner.cpu_allocator import keep_freed_memory_mapped
from server.model_runner.request_state import RequestState
from server.model_runner.sampler import Sampler, prompt_token_logprobs
from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.base import ModelOptions
from server.models.errors import ModelLoadError
from server.models.gguf import find_gguf
from server.models.layers.linear_methods import get_linear_method
from server.models.loader import load_model, packed_int_format, resolve_dtype
from server.outputs import RunnerOutput, SampleResult
from server.scheduler.output import NewRequestData, SchedulerOutput
from server.structured.cache import GrammarCache
from server.structured.matcher import GrammarState

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30
_PROMPT_LOGPROB_ROWS = 256  # prompt positions whose logits are held at once


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(device)


def _available_memory_bytes(proc: str = "/proc/meminfo",
                            cgroup: str = "/sys/fs/cgroup") -> int | None:
    """What this process may still allocate: MemAvailable (Linux), capped by a cgroup v2 memory
    limit (a container's) when there is one; None where neither can be read."""
    limits: list[int] = []
    try:
        with open(proc) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{cgroup}/memory.max") as f_max, open(f"{cgroup}/memory.current") as f_cur:
            limit, current = f_max.read().strip(), f_cur.read().strip()
        if limit != "max":
            limits.append(max(0, int(limit) - int(current)))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def effective_config(config: EngineConfig, runner: ModelRunner,
                     max_model_len: int) -> EngineConfig:
    """`config` with what start-up resolved: the context length, dtype, device, kernels, block
    count (and the memory it takes) and the step's token budget."""
    model = dataclasses.replace(
        config.model, max_model_len=max_model_len,
        dtype=str(runner.dtype).removeprefix("torch."), device=runner.device.type,
        attention_backend=runner.kernels.attention_backend,
        compiled_decode=runner.compiled_step is not None, quantization=runner.quantization)
    cache = dataclasses.replace(config.cache, num_blocks=runner.num_blocks,
                                kv_cache_memory=runner.num_blocks * runner.bytes_per_block)
    return dataclasses.replace(config, model=model, cache=cache,
                               scheduler=config.scheduler.for_device(runner.device.type))


def weight_format(quantization: str, model_dir: Path) -> str:
    """The quantization in effect: the checkpoint's own blocks (a GGUF file's "gguf", a GPTQ or
    AWQ checkpoint's "gptq", "awq") where none is asked."""
    if find_gguf(model_dir) is not None:
        own = "gguf"
    else:
        packed = packed_int_format(model_dir)
        own = "none" if packed is None else packed.method
    if quantization in ("gguf", "gptq", "awq") and quantization != own:
        what = {"gguf": "a GGUF file", "gptq": "a GPTQ checkpoint", "awq": "an AWQ checkpoint"}
        raise ModelLoadError(f"quantization {quantization!r} takes {what[quantization]}; "
                             f"{model_dir} is not one")
    return own if quantization == "none" else quantization


def compute_dtype(dtype: str, arch: ArchConfig, quantization: str, device: torch.device
                  ) -> torch.dtype:
    """The model's dtype: "auto" takes the checkpoint's, but fp32 for a GPTQ or AWQ checkpoint
    on CPU (saved in fp16, which the CPU paths do not compute in; the 8-bit GEMM computes in
    fp32)."""
    if dtype == "auto" and quantization in ("gptq", "awq") and device.type == "cpu":
        return torch.float32
    return resolve_dtype(dtype, arch)


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ArchConfig, model_dir: Path,
                 max_model_len: int, grammars: GrammarCache | None = None) -> None:
        self.config = config
        self.grammars = grammars  # where constrained requests' grammars come from
        self.arch = arch
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.device = resolve_device(config.model.device)
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.quantization = weight_format(config.model.quantization, model_dir)
        self.dtype = compute_dtype(config.model.dtype, arch, self.quantization, self.device)
        self.kernels = choose_kernels(config.model, self.device, self.dtype)
        options = ModelOptions(max_position=max(max_model_len, arch.max_position_embeddings),
                               dtype=self.dtype,
                               linear_method=get_linear_method(
                                   self.quantization, "triton"
                                   if self.kernels.attention_backend == "triton" else "auto"),
                               kernel_backend=self.kernels.kernel_backend)
        self.model = load_model(model_dir, arch, options, self.device)
        packed = "none (not on CPU)"
        if self.device.type == "cpu":
            # The packed copies may take at most half of the memory still available.
            budget = _available_memory_bytes()
            step_rows = config.scheduler.for_device("cpu").max_num_batched_tokens
            assert step_rows is not None
            packed = pack_for_cpu(self.model, self.kernels, config.model, step_rows,
                                  None if budget is None else budget // 2)
        self.num_blocks = self._num_blocks()
        shape = (self.num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(arch.num_layers)]
        self.compiled_step, compiled = compiled_decode_step(self.model, config.model,
                                                            self.kernels, self.kv_caches)
        self.native_prefill_len, prompts = native_prefill_len(
            self.kernels, arch, self.dtype, self.block_size, max_model_len)
        logger.info("kernels: attention %s%s, fused layer ops %s, linear weights %s, compiled "
                    "decode step %s", self.kernels.attention_backend, prompts,
                    "on" if self.kernels.fused_ops else "off", packed, compiled)
        self.sampler = Sampler(seed=config.model.seed)
        self._states: dict[str, RequestState] = {}
        self._generators: dict[str, torch.Generator] = {}

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return (2 * self.arch.num_layers * self.block_size * self.arch.num_kv_heads
                * self.arch.head_dim * elem)

    def _num_blocks(self) -> int:
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_blocks = self.config.cache.num_blocks
        if num_blocks is not None:
            what, knob = f"num_blocks={num_blocks} is", "num_blocks"
        else:
            budget = self.config.cache.kv_cache_memory
            if budget is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    budget = int(free * 0.85)
                else:
                    budget = DEFAULT_CPU_KV_CACHE_MEMORY
            num_blocks = budget // self.bytes_per_block
            what = f"kv_cache_memory={budget} bytes holds {num_blocks} blocks, which is"
            knob = "kv_cache_memory"
        if num_blocks < blocks_per_seq:
            raise ModelLoadError(
                f"{what} fewer blocks of {self.block_size} tokens than one sequence of "
                f"max_model_len={self.max_model_len} needs ({blocks_per_seq} blocks, "
                f"{blocks_per_seq * self.bytes_per_block} bytes); raise {knob} or lower "
                f"max_model_len")
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB); max concurrency at "
                    "max_model_len=%d: %.2f sequences", num_blocks, self.block_size,
                    num_blocks * self.bytes_per_block / 2**20, self.max_model_len,
                    num_blocks / blocks_per_seq)
        return num_blocks

    def _prepare(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor,
                                                          AttentionMetadata]:
        scheduled = output.scheduled
        num_seqs = len(scheduled)
        states = [self._states[e.request_id] for e in scheduled]
        token_ids: list[int] = []
        starts, lens = [], []
        for entry, state in zip(scheduled, states):
            start, n = entry.num_computed_tokens, entry.num_scheduled_tokens
            token_ids.extend(state.token_ids[start:start + n])
            starts.append(start)
            lens.append(n)
        max_blocks = max(len(s.block_ids) for s in states)
        table = torch.zeros((num_seqs, max_blocks), dtype=torch.int32)
        for i, state in enumerate(states):
            table[i, :len(state.block_ids)] = torch.tensor(state.block_ids, dtype=torch.int32)
        q_lens = torch.tensor(lens, dtype=torch.int64)
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
        query_start_loc[1:] = torch.cumsum(q_lens, 0)
        positions = (torch.arange(len(token_ids)) - query_start_loc[seq_idx]
                     + torch.tensor(starts, dtype=torch.int64)[seq_idx])
        slot_mapping = (table[seq_idx, positions // self.block_size].long() * self.block_size
                        + positions % self.block_size)
        seq_lens = torch.tensor(starts, dtype=torch.int32) + q_lens.to(torch.int32)
        dev = self.device
        query_start_loc, seq_lens, table = (query_start_loc.to(torch.int32).to(dev),
                                            seq_lens.to(dev), table.to(dev))
        backend = self.kernels.attention_backend
        md = AttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=table,
            slot_mapping=slot_mapping.to(dev), attention_backend=backend,
            plan=ops.attention_plan(table, seq_lens, query_start_loc, self.block_size,
                                        self.arch.sliding_window, backend=backend,
                                        native_prefill_len=self.native_prefill_len))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        return input_ids, positions.to(dev), md

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def _grammar_for(self, new: NewRequestData) -> GrammarState | None:
        spec = new.sampling_params.structured_outputs
        if spec is None:
            return None
        if self.grammars is None:
            raise ValueError("this model runner has no grammar cache for structured outputs")
        # The engine compiled it before scheduling; a grammar evicted since compiles here.
        return GrammarState(self.grammars.matcher(spec), new.token_ids[new.num_prompt_tokens:])

    def _update_states(self, output: SchedulerOutput) -> None:
        for request_id in output.finished_req_ids:
            self._states.pop(request_id, None)
            self._generators.pop(request_id, None)
        for request_id in output.preempted_req_ids:  # a seeded generator runs on after resuming
            self._states.pop(request_id, None)
        for entry in output.scheduled:
            new = entry.new_request
            if new is not None:
                self._states[entry.request_id] = RequestState.from_new(
                    entry.request_id, new, entry.new_block_ids,
                    self._generator_for(entry.request_id, new.sampling_params.seed),
                    self._grammar_for(new))
            elif entry.new_block_ids:
                self._states[entry.request_id].block_ids.extend(entry.new_block_ids)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 md: AttentionMetadata) -> torch.Tensor:
        """The model's forward, or the compiled decode step where it applies."""
        if self.compiled_step is not None and self.compiled_step.applies(len(input_ids), md):
            return self.compiled_step(input_ids, positions, md)
        return self.model(input_ids, positions, self.kv_caches, md)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        self._update_states(output)
        if output.empty:
            return RunnerOutput()
        input_ids, positions, md = self._prepare(output)
        hidden = self._forward(input_ids, positions, md)
        result = RunnerOutput(prompt_logprobs=self._prompt_logprobs(hidden, output))
        rows, last_indices = [], []
        for i, entry in enumerate(output.scheduled):
            if entry.samples:
                rows.append(self._states[entry.request_id])
                last_indices.append(i)
        if not rows:
            return result
        logits_index = md.query_start_loc[1:][torch.tensor(last_indices, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[logits_index.long()])
        samples = self.sampler(logits, rows)
        for row, sample in zip(rows, samples):
            row.token_ids.append(sample.token_id)
            if row.grammar is not None and not row.grammar.accept(sample.token_id):
                result.grammar_ended.add(row.request_id)
        result.samples = {row.request_id: s for row, s in zip(rows, samples)}
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, output: SchedulerOutput
                         ) -> dict[str, list[SampleResult]]:
        """For each request that asks, the raw logprobs of the prompt tokens this step's chunk
        predicts: position p's logits score prompt token p + 1 (the last prompt position's score
        the first output token, which the sampler handles)."""
        found: dict[str, list[SampleResult]] = {}
        offset = 0
        for entry in output.scheduled:
            state = self._states[entry.request_id]
            start, count = entry.num_computed_tokens, entry.num_scheduled_tokens
            row_offset, offset = offset, offset + count
            num_top = state.sampling_params.prompt_logprobs
            if num_top is None or state.num_output_tokens > 0:
                continue  # not asked, or already delivered before a preemption
            count = min(count, state.num_prompt_tokens - 1 - start)
            results: list[SampleResult] = []
            for first in range(0, count, _PROMPT_LOGPROB_ROWS):  # bounded logits memory
                last = min(count, first + _PROMPT_LOGPROB_ROWS)
                logits = self.model.compute_logits(hidden[row_offset + first:row_offset + last])
                targets = state.token_ids[start + first + 1:start + last + 1]
                results += prompt_token_logprobs(logits, targets, num_top)
            if results:
                found[entry.request_id] = results
        return found

"""The model runner: owns the weights and the KV cache tensors, turns a SchedulerOutput into one
flattened forward pass, and samples for the requests whose last token was scheduled."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

import kernels
from server.config import EngineConfig
from server.model_runner.cpu_allocator import keep_freed_memory_mapped
from server.model_runner.request_state import RequestState
from server.model_runner.sampler import Sampler
from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.errors import ModelLoadError
from server.models.layers.linear import SMALL_ROWS, Linear, pack_linear_weights
from server.models.llama import COMPILED_DECODE_ROWS, use_compiled_decode, use_fused_cpu_ops
from server.models.loader import load_model, resolve_dtype
from server.outputs import SampleResult
from server.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30


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


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ArchConfig, model_dir: Path,
                 max_model_len: int) -> None:
        self.config = config
        self.arch = arch
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.device = resolve_device(config.model.device)
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.dtype = resolve_dtype(config.model.dtype, arch)
        self.model = load_model(model_dir, arch, self.dtype, self.device,
                                max_position=max(max_model_len, arch.max_position_embeddings))
        if self.device.type == "cpu":
            compiled = config.model.attention_backend in ("auto", "cpu")
            if compiled:
                self._use_compiled_cpu_kernels()
            # The packed copies may take at most half of the memory still available.
            budget = _available_memory_bytes()
            count = pack_linear_weights(self.model, None if budget is None else budget // 2,
                                        small=compiled and kernels.cpu_linear.available())
            small = sum(1 for m in self.model.modules() if isinstance(m, Linear)
                        and m.packed is not None and m.packed.small is not None)
            logger.info("prepacked %d linear weights for CPU GEMMs (%d with a copy for %d-%d "
                        "rows)", count, small, *SMALL_ROWS)
            if (compiled and os.environ.get("PAGEDSERVE_COMPILED_DECODE", "1") != "0"
                    and use_compiled_decode(self.model)):  # it checks the model is fp32
                logger.info("compiled decode step: decode-only steps of 1-%d sequences run "
                            "every layer in one kernel call", COMPILED_DECODE_ROWS)
        self.num_blocks = self._num_blocks_from_budget()
        shape = (self.num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(arch.num_layers)]
        self.sampler = Sampler(seed=config.model.seed)
        self._states: dict[str, RequestState] = {}
        self._generators: dict[str, torch.Generator] = {}

    def _use_compiled_cpu_kernels(self) -> None:
        """Build (or load from the cache) the compiled CPU kernels now rather than in the first
        request, and route the fp32 layers' element-wise steps through the fused ones."""
        attention = kernels.cpu_attention.available()
        fused = (self.dtype == torch.float32 and kernels.cpu_fused.available()
                 and use_fused_cpu_ops(self.model) > 0)
        if attention or fused:
            logger.info("compiled CPU kernels: decode attention %s, fused layer ops %s",
                        "on (fp32)" if attention else "off", "on" if fused else "off")

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return (2 * self.arch.num_layers * self.block_size * self.arch.num_kv_heads
                * self.arch.head_dim * elem)

    def _num_blocks_from_budget(self) -> int:
        budget = self.config.cache.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = budget // self.bytes_per_block
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if num_blocks < blocks_per_seq:
            raise ModelLoadError(
                f"kv_cache_memory={budget} bytes holds {num_blocks} blocks of "
                f"{self.block_size} tokens, fewer than one sequence of max_model_len="
                f"{self.max_model_len} needs ({blocks_per_seq} blocks, "
                f"{blocks_per_seq * self.bytes_per_block} bytes); raise kv_cache_memory or "
                f"lower max_model_len")
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
        md = AttentionMetadata(
            query_start_loc=query_start_loc.to(torch.int32).to(dev),
            seq_lens=seq_lens.to(dev),
            block_table=table.to(dev),
            slot_mapping=slot_mapping.to(dev),
            attention_backend=self.config.model.attention_backend,
        )
        md.plan = kernels.attention_plan(md.block_table, md.seq_lens, md.query_start_loc,
                                         self.block_size, self.arch.sliding_window,
                                         backend=md.attention_backend)
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
                    self._generator_for(entry.request_id, new.sampling_params.seed))
            elif entry.new_block_ids:
                self._states[entry.request_id].block_ids.extend(entry.new_block_ids)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, SampleResult]:
        self._update_states(output)
        if output.empty:
            return {}
        input_ids, positions, md = self._prepare(output)
        hidden = self.model(input_ids, positions, self.kv_caches, md)
        rows, last_indices = [], []
        for i, entry in enumerate(output.scheduled):
            if entry.samples:
                rows.append(self._states[entry.request_id])
                last_indices.append(i)
        if not rows:
            return {}
        logits_index = md.query_start_loc[1:][torch.tensor(last_indices, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[logits_index.long()])  # type: ignore[operator]
        results = self.sampler(logits, rows)
        for row, result in zip(rows, results):
            row.token_ids.append(result.token_id)
        return {row.request_id: r for row, r in zip(rows, results)}

"""Which CPU paths run, decided once from the frozen config and from what builds on this
machine, and logged: the attention kernel, the fused element-wise ops, the packed GEMM copies and
the compiled decode step. The model describes its computation once; this module picks the
kernels its layers dispatch to (`kernel_backend`) and owns the compiled decode step, fed by the
model's `export_decoder` hook (models/base.py), as a CUDA graph would be."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedserve_kernels import cpu_attention, cpu_decoder, cpu_fused
from server.config import ModelConfig
from server.model_runner import prefill_choice, step_choice
from server.models.arch_config import ArchConfig
from server.models.attention_metadata import AttentionMetadata
from server.models.base import CausalLM, DecoderExport, KVCache
from server.models.layers import packed_gemm
from server.models.layers.gemm_choice import bucket_bounds
from server.models.layers.linear import Linear, pack_linear_weights
from server.models.layers.packed_gemm import GemmPolicy, PackedWeight
from server.models.layers.quantized_linear import is_quantized

logger = logging.getLogger(__name__)

COMPILED_DECODE_ROWS = 64  # decode-only steps of up to this many rows: kernels.cpu_decoder


@dataclass(frozen=True)
class KernelChoice:
    """Made before the model is built: what its layers and attention dispatch to."""
    attention_backend: str  # resolved: "triton", "cpu" or "torch"
    kernel_backend: str  # the layers' element-wise ops: "cpu" (kernels.cpu_fused) or "torch"
    native: bool  # the compiled CPU kernels may run (CPU, backend auto or cpu)

    @property
    def fused_ops(self) -> bool:
        return self.kernel_backend == "cpu"


def choose_kernels(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    asked = config.attention_backend
    if device.type != "cpu":
        return KernelChoice("triton" if asked == "auto" else asked, "torch", native=False)
    native = asked in ("auto", "cpu")
    attention = ("cpu" if cpu_attention.available() else "torch") if native else asked
    fused = native and dtype in cpu_fused.DTYPES and cpu_fused.available()
    return KernelChoice(attention, "cpu" if fused else "torch", native)


def native_prefill_len(choice: KernelChoice, arch: ArchConfig, dtype: torch.dtype,
                       block_size: int, max_model_len: int) -> tuple[int | None, str]:
    """Up to which sequence length the compiled attention kernel takes prompt rows (measured;
    None: all of them, where nothing is timed), and the start-up log's words for it."""
    if choice.attention_backend != "cpu" or dtype not in cpu_attention.DTYPES:
        return None, ""
    if packed_gemm.unmeasured():
        return None, " (prompt rows in the kernel at every length)"
    limit = prefill_choice.measured_len(arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                        block_size, dtype, arch.sliding_window, max_model_len)
    if limit == 0:
        return 0, " (prompts through SDPA: the kernel measured slower at every length)"
    return limit, f" (prompt rows in the kernel up to {limit} tokens, SDPA beyond)"


def pack_for_cpu(model: CausalLM, choice: KernelChoice, config: ModelConfig, max_rows: int,
                 budget_bytes: int | None) -> str:
    """Make the GEMM copies each weight's measured (or forced) table uses; returns the tables,
    for the start-up log."""
    policy = GemmPolicy(forced=config.cpu_gemm, own=choice.native, max_rows=max_rows)
    count = pack_linear_weights(model, budget_bytes, policy)
    tables: dict[str, str] = {}
    for m in model.modules():
        packed = getattr(m, "packed", None)  # Linear's, and a tied LMHead's
        if isinstance(packed, PackedWeight):
            tables[f"{packed.shape[1]}x{packed.shape[0]}"] = packed.table.describe()
    served = "; ".join(f"{shape}: {table}" for shape, table in tables.items())
    quantized = sum(is_quantized(m) for m in model.modules())
    return (f"{count} packed (GEMM per row count, in x out: {served or 'F.linear everywhere'})"
            + (f", {quantized} in 8-bit blocks (kernels.cpu_quant)" if quantized else ""))


def _not_compiled_because(model: CausalLM, export: DecoderExport | None) -> str | None:
    if export is None:
        return f"{type(model).__name__} has no export_decoder: decode runs layer by layer"
    if not export.layers:
        return "the model has no layers"
    weight = export.embed_tokens.weight
    if weight.dtype not in cpu_decoder.DTYPES or weight.device.type != "cpu":
        return f"it computes in fp32 or bf16 on CPU only, not {weight.dtype} on {weight.device}"
    if weight.dtype != torch.float32 and any(is_quantized(m) for m in _projections(export)):
        return "8-bit projections in a bf16 model (the step takes them in fp32 only)"
    if any(not is_quantized(m) and (m.packed is None or m.packed.own is None)
           for m in _projections(export)):
        return ("not every projection has a copy for the compiled GEMM (made where the own "
                "GEMM measured fastest at some row count; --cpu-gemm own forces it)")
    if any(m.q8_perm is not None for m in _projections(export)):
        return ("a projection's 8-bit tiles take its inputs in another order (a GPTQ act-order "
                "checkpoint) and the compiled step has no gather for them")
    if not cpu_decoder.available():
        return "kernels.cpu_decoder did not build"
    return None


class CompiledDecodeStep:
    """Every layer of a decode-only step of 1..max_rows rows in one kernels.cpu_decoder call,
    over the model's exported weights and the runner's caches."""

    def __init__(self, export: DecoderExport, kv_caches: list[KVCache], max_rows: int) -> None:
        self.export = export
        self.max_rows = max_rows
        layers = []
        for layer, (key_cache, value_cache) in zip(export.layers, kv_caches, strict=True):
            projections = (layer.qkv, layer.o, layer.gate_up, layer.down)
            layers.append(cpu_decoder.LayerTensors(
                input_norm=layer.input_norm.detach(),
                qkv=_small_copy(layer.qkv), qkv_bias=_bias(layer.qkv),
                q_norm=None if layer.q_norm is None else layer.q_norm.detach(),
                k_norm=None if layer.k_norm is None else layer.k_norm.detach(),
                o=_small_copy(layer.o), o_bias=_bias(layer.o),
                post_norm=layer.post_norm.detach(),
                gate_up=_small_copy(layer.gate_up), gate_up_bias=_bias(layer.gate_up),
                down=_small_copy(layer.down), down_bias=_bias(layer.down),
                key_cache=key_cache, value_cache=value_cache,
                amx_min_rows=tuple(0 if is_quantized(m)  # type: ignore[arg-type]
                                   else _packed(m).table.amx_min_rows for m in projections),
                q8=tuple(is_quantized(m) for m in projections)))  # type: ignore[arg-type]
        self.tensors = cpu_decoder.DecoderTensors(
            layers, export.final_norm.detach(), num_heads=export.num_heads,
            num_kv_heads=export.num_kv_heads, head_dim=export.head_dim, eps=export.eps)

    def applies(self, num_tokens: int, md: AttentionMetadata) -> bool:
        plan = md.plan
        return (num_tokens <= self.max_rows and plan is not None and plan.all_decode
                and plan.native)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 md: AttentionMetadata) -> torch.Tensor:
        export = self.export
        h = export.embed_tokens(input_ids)
        cos, sin = export.rotary.cos_sin(positions, h.dtype)
        return cpu_decoder.decode_step(self.tensors, h, cos, sin, md.slot_mapping,
                                       md.block_table, md.seq_lens, export.scale,
                                       export.sliding_window)


def compiled_decode_step(model: CausalLM, config: ModelConfig, choice: KernelChoice,
                         kv_caches: list[KVCache]) -> tuple[CompiledDecodeStep | None, str]:
    """The compiled step where it applies, and the start-up log's reason where it does not."""
    if not config.compiled_decode:
        return None, "off (compiled_decode=False)"
    if not choice.native:
        return None, f"off (attention backend {config.attention_backend})"
    export = model.export_decoder()
    reason = _not_compiled_because(model, export)
    if reason is not None or export is None:
        return None, f"off ({reason})"
    step = CompiledDecodeStep(export, kv_caches, COMPILED_DECODE_ROWS)
    if packed_gemm.unmeasured():
        step.max_rows = min([COMPILED_DECODE_ROWS]
                            + [_packed(m).own_rows for m in _projections(export)
                               if not is_quantized(m)])
        if step.max_rows == 0:
            return None, "off (the own GEMM does not take 1 row)"
    else:
        step.max_rows = _measured_rows(model, export, step, kv_caches, choice)
        if step.max_rows == 0:
            return None, "off (the layer-by-layer forward measured faster even at 1 row)"
    return step, f"on for decode-only steps of 1-{step.max_rows} sequences"


def _measured_rows(model: CausalLM, export: DecoderExport, step: CompiledDecodeStep,
                   kv_caches: list[KVCache], choice: KernelChoice) -> int:
    num_blocks, block_size = kv_caches[0][0].shape[:2]
    tables = sorted({"8-bit" if is_quantized(m) else
                     f"{_packed(m).shape}: {_packed(m).table.describe()}"
                     for m in _projections(export)})
    shape = [str(export.final_norm.dtype), len(export.layers), export.final_norm.shape[0],
             export.num_heads, export.num_kv_heads, export.head_dim,
             step.tensors.intermediate, export.sliding_window]

    def measure(rows: int) -> tuple[float, float]:
        batch = step_choice.decode_batch(rows, num_blocks, block_size, export.sliding_window,
                                         choice.attention_backend)
        return step_choice.timings(step, lambda ids, pos, md: model(ids, pos, kv_caches, md),
                                   batch)

    return step_choice.measured_rows([*shape, tables], bucket_bounds(COMPILED_DECODE_ROWS),
                                     measure)


def _projections(export: DecoderExport) -> list[Linear]:
    return [m for layer in export.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]


def _packed(module: Linear) -> PackedWeight:
    assert module.packed is not None
    return module.packed


def _small_copy(module: Linear) -> torch.Tensor:
    """The compiled step's weight of a projection: its 8-bit tiles or the own GEMM's copy."""
    if module.q8 is not None:
        return module.q8
    own = _packed(module).own
    assert own is not None
    return own


def _bias(module: Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


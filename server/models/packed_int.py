"""GPTQ and AWQ safetensors checkpoints (`quantization_config.quant_method` "gptq" or "awq" in
config.json): each quantized linear layer's packed integer tensors become one `IntBlocks`
weight under the layer's `.weight` name, for the LinearMethod that computes with blocks
(models/layers/quantized_linear.py).

The formats, per layer with in_features K, out_features N, groups of G input values:
- GPTQ: `qweight` int32 [K / p, N] with p = 32 / bits values per word, value k = p i + j of
  column n in bits j*bits.. of word (i, n); `qzeros` int32 [K / G, N / p] packed the same way
  along N; `scales` fp16 [K / G, N]; `g_idx` int32 [K], the group of each input (act-order
  checkpoints quantize the inputs in another order, so groups are not contiguous; absent or
  k // G otherwise). w[n, k] = scale[g, n] * (q - zero[g, n]), g = g_idx[k]. The original
  format ("gptq", v1) stores zero - 1, "gptq_v2" the zero itself.
- AWQ ("gemm" packing): `qweight` int32 [K, N / 8], word (k, i) holds columns 8 i + order[j]
  in nibble j, order = 0 2 4 6 1 3 5 7; `qzeros` int32 [K / G, N / 8] the same; `scales` fp16
  [K / G, N]; w = scale * (q - zero).

The blocks hold the values, scales and zeros exactly; the 8-bit GEMM's offset m = -scale * zero
is rounded to fp16 (exact for the symmetric zero 2^(bits - 1); else a relative 2^-11 of m,
about 1% of the rounding noise a 4-bit value already carries). An act-order layer's inputs are
sorted by group so that every block of 32 lies in one group; `perm` names the input each
column takes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from server.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

BLOCK = 32  # values per scale in IntBlocks (pagedserve_kernels.cpu_quant.BLOCK)
METHODS = ("gptq", "awq")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8 i + order[j]
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class IntBlocks:
    """A [rows, cols] weight as blocks of 32 integer values along the input: w = d * (q - z)
    per block (scales d [rows, cols / 32] fp16, zeros z [rows, cols / 32] int16; values q
    [rows, cols] int8), over the inputs in the order `perm` (None: their own order): column c
    of `values` is input perm[c]."""

    scales: torch.Tensor
    values: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    shape: tuple[int, int]

    def mins(self) -> torch.Tensor:
        """The offsets m = -d * z of the 8-bit GEMM's d * q + m, rounded to fp16."""
        return (-(self.scales.float() * self.zeros)).to(torch.float16)

    def dequantize(self) -> torch.Tensor:
        """The [rows, cols] fp32 weight, exactly, in the inputs' own order."""
        rows, cols = self.shape
        q = self.values.view(rows, -1, BLOCK).float() - self.zeros.float()[..., None]
        w = (q * self.scales.float()[..., None]).view(rows, cols)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


@dataclass(frozen=True)
class PackedIntFormat:
    """A checkpoint's quantization_config: method, bits, group size (-1: one group a row) and
    the amount GPTQ v1 subtracted from its stored zeros."""

    method: str
    bits: int
    group_size: int
    zero_offset: int = 0

    def tensors(self, weights: Iterable[tuple[str, torch.Tensor]], names: Collection[str]
                ) -> Iterator[tuple[str, torch.Tensor | IntBlocks]]:
        """The checkpoint's tensors with each quantized layer's parts (`names` says which
        exist) replaced by one `<layer>.weight`: IntBlocks, or the float weight where its
        groups do not fall on blocks of 32 (logged)."""
        expected: dict[str, set[str]] = {}
        for name in names:
            prefix, _, part = name.rpartition(".")
            if part in _PARTS and f"{prefix}.qweight" in names:
                expected.setdefault(prefix, set()).add(part)
        for prefix, parts in expected.items():
            missing = {"qzeros", "scales"} - parts
            if missing:
                raise ModelLoadError(f"the {self.method} layer {prefix} lacks "
                                     f"{', '.join(sorted(missing))}")
            if self.method == "awq" and "g_idx" in parts:
                raise ModelLoadError(f"the awq layer {prefix} has a g_idx (AWQ has none)")
        pending: dict[str, dict[str, torch.Tensor]] = {}
        floats = 0
        for name, tensor in weights:
            prefix, _, part = name.rpartition(".")
            if prefix not in expected or part not in _PARTS:
                yield name, tensor
                continue
            pending.setdefault(prefix, {})[part] = tensor
            if pending[prefix].keys() == expected[prefix]:
                weight = self._weight(prefix, **pending.pop(prefix))
                floats += not isinstance(weight, IntBlocks)
                yield f"{prefix}.weight", weight
        if floats:
            logger.warning("%s: %d layers' groups do not fall on blocks of %d inputs: "
                           "dequantized at load", self.method, floats, BLOCK)

    def _weight(self, prefix: str, qweight: torch.Tensor, qzeros: torch.Tensor,
                scales: torch.Tensor, g_idx: torch.Tensor | None = None
                ) -> torch.Tensor | IntBlocks:
        for part, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != torch.int32 or t.dim() != 2:
                raise ModelLoadError(f"{prefix}.{part}: expected a 2-D int32 tensor, "
                                     f"not {t.dtype} {tuple(t.shape)}")
        if self.method == "gptq":
            q = _unpack(qweight.t(), self.bits).t()  # [K, N]
            zeros = _unpack(qzeros, self.bits) + self.zero_offset  # [groups, N]
        else:
            q, zeros = _unpack_awq(qweight), _unpack_awq(qzeros)
        in_features, out_features = q.shape
        group_size = in_features if self.group_size == -1 else self.group_size
        num_groups = -(-in_features // group_size)
        if g_idx is None:
            g_idx = torch.arange(in_features) // group_size
        expected = {"scales": (num_groups, out_features), "qzeros": (num_groups, out_features),
                    "g_idx": (in_features,)}
        for part, t in (("scales", scales), ("qzeros", zeros), ("g_idx", g_idx)):
            if tuple(t.shape) != expected[part]:
                raise ModelLoadError(f"{prefix}.{part}: shape {tuple(t.shape)} does not fit "
                                     f"qweight's {in_features} inputs x {out_features} outputs "
                                     f"in groups of {group_size} ({self.bits}-bit)")
        g_idx = g_idx.to(torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
            raise ModelLoadError(f"{prefix}.g_idx names groups outside 0..{num_groups - 1}")
        scales = scales.to(torch.float16)
        order = torch.argsort(g_idx, stable=True)
        perm = None if torch.equal(order, torch.arange(in_features)) else order
        groups = g_idx[order]
        if in_features % BLOCK or not bool((groups.view(-1, BLOCK) == groups.view(
                -1, BLOCK)[:, :1]).all()):
            return (scales[g_idx].float() * (q - zeros[g_idx]).float()).t().contiguous()
        columns = q.t() if perm is None else q.t()[:, perm]  # [N, K] in block order
        block_groups = groups.view(-1, BLOCK)[:, 0]
        centre = 128 if self.bits == 8 else 0  # int8 holds 8-bit values as q - 128
        return IntBlocks(scales[block_groups].t().contiguous(),
                         (columns - centre).to(torch.int8).contiguous(),
                         (zeros[block_groups].t() - centre).to(torch.int16).contiguous(), perm,
                         (out_features, in_features))


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, cols] -> int32 [rows, cols * 32 / bits]: value j of a word in bits j*bits.."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    values = _unpack(packed, 4).view(packed.shape[0], -1, 8)
    return values[..., list(_AWQ_ORDER.index(c) for c in range(8))].reshape(packed.shape[0], -1)


def read_format(raw_config: dict[str, Any]) -> PackedIntFormat | None:
    """The config.json's quantization_config as a PackedIntFormat (None without one); one this
    server cannot serve stops start-up with a message that names the field."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelLoadError("config.json's quantization_config is not an object")
    method = qc.get("quant_method")
    if method not in METHODS:
        raise ModelLoadError(f"quantization_config.quant_method {method!r} is not supported; "
                             f"supported: {', '.join(METHODS)}")
    bits: Any = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size"))
    supported_bits = (2, 4, 8) if method == "gptq" else (4,)
    if bits not in supported_bits:
        raise ModelLoadError(f"quantization_config.bits {bits!r} is not supported for {method}; "
                             f"supported: {', '.join(map(str, supported_bits))}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (
            group_size > 0 or group_size == -1):
        raise ModelLoadError(f"quantization_config.group_size {group_size!r} is not a group "
                             "size (a positive integer, or -1)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"quantization_config.version {version!r} (AWQ packing) is "
                                 "not supported; supported: gemm")
        if qc.get("zero_point", True) is not True:
            raise ModelLoadError("quantization_config.zero_point false (AWQ without zeros) is "
                                 "not supported")
        return PackedIntFormat("awq", bits, group_size)
    if qc.get("dynamic"):
        raise ModelLoadError("quantization_config.dynamic (per-layer GPTQ settings) is not "
                             "supported")
    checkpoint_format = qc.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"quantization_config.checkpoint_format {checkpoint_format!r} is "
                             "not supported; supported: gptq, gptq_v2")
    return PackedIntFormat("gptq", bits, group_size, 1 if checkpoint_format == "gptq" else 0)

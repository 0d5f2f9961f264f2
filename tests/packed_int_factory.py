"""GPTQ and AWQ checkpoints for tests, written from a tiny float model directory
(tests/model_factory.py) in the formats' own layouts: GPTQ's qweight/qzeros/scales/g_idx (v1
zeros stored minus one, or v2), AWQ's column-interleaved "gemm" words. The values come from
round-to-nearest per group (GPTQ's error-compensating search changes which values, not how they
are stored, and the layouts are what a loader must get right); an act-order checkpoint groups
the inputs in a random order shared by the layers that read the same input, as GPTQ's order
from one Hessian is. Each checkpoint comes with a float copy of the same model holding the
weights the packed ones stand for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8 i + AWQ_ORDER[j]
_INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    order: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [K, N], zeros [groups, N], scales [groups, N] fp16, g_idx [K]): input k
    in group g_idx[k], the groups taken along `order` (None: the inputs' own order)."""
    n, k = w.shape
    group_size = k if group_size == -1 else group_size
    position = torch.empty(k, dtype=torch.int64)
    position[torch.arange(k) if order is None else order] = torch.arange(k)
    g_idx = (position // group_size).to(torch.int32)
    maxq = (1 << bits) - 1
    num_groups = -(-k // group_size)
    q = torch.empty(k, n, dtype=torch.int64)
    zeros = torch.empty(num_groups, n, dtype=torch.int64)
    scales = torch.empty(num_groups, n, dtype=torch.float16)
    for g in range(num_groups):
        cols = (g_idx == g).nonzero().flatten()
        part = w[:, cols].double()
        lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-8).to(torch.float16)
        zero = (torch.full_like(hi, (maxq + 1) // 2) if sym
                else (-lo / scale.double()).round().clamp(0, maxq))
        values = (part / scale.double()[:, None]).round() + zero[:, None]
        q[cols] = values.clamp(0, maxq).to(torch.int64).t()
        zeros[g], scales[g] = zero.to(torch.int64), scale
    return q, zeros, scales, g_idx


def dequantized(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor) -> torch.Tensor:
    """The [N, K] fp32 weight: scale * (q - zero) of each input's group."""
    g = g_idx.to(torch.int64)
    return (scales[g].float() * (q - zeros[g]).float()).t().contiguous()


def _words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 [rows, cols] of values < 2^bits -> int32 [rows, cols * bits / 32]: value j of a
    word in its bits j * bits .."""
    per_word = 32 // bits
    v = values.view(values.shape[0], -1, per_word)
    word = (v << (torch.arange(per_word) * bits)).sum(-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, bits: int, v1: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [K * bits / 32, N], qzeros [groups, N * bits / 32]); v1 stores zero - 1, so
    it has no zero of 0 (its readers would see 2^bits): groups of weights of both signs have
    none."""
    assert not v1 or int(zeros.min()) >= 1, "GPTQ v1 cannot store a zero of 0"
    stored = zeros - 1 if v1 else zeros
    return _words(q.t().contiguous(), bits).t().contiguous(), _words(stored, bits)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [K, N / 8], qzeros [groups, N / 8]) in AWQ's interleaved column order."""
    def interleave(values: torch.Tensor) -> torch.Tensor:
        return _words(values.view(values.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(
            values.shape), 4)

    return interleave(q), interleave(zeros)


def write_packed(model_dir: Path, out_dir: Path, method: str = "gptq", bits: int = 4,
                 group_size: int = 32, sym: bool = False, act_order: bool = False,
                 checkpoint_format: str = "gptq", seed: int = 0) -> tuple[Path, Path]:
    """(the packed checkpoint, its float copy): every *_proj weight of `model_dir` quantized,
    the rest rounded to fp16 (stored fp16 in the packed checkpoint, as quantizers save them)."""
    packed_dir, float_dir = out_dir / method, out_dir / f"{method}-float"
    tensors = load_file(model_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    orders: dict[tuple[str, str], torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    floats: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        prefix, _, part = name.rpartition(".")
        proj = prefix.rpartition(".")[2]
        if part != "weight" or proj not in _INPUT_OF:
            packed[name] = w.to(torch.float16)
            floats[name] = packed[name].float()
            continue
        order = None
        if act_order:
            key = (prefix.split(".")[2], _INPUT_OF[proj])
            if key not in orders:
                orders[key] = torch.randperm(w.shape[1], generator=generator)
            order = orders[key]
        q, zeros, scales, g_idx = quantize_groups(w, bits, group_size, sym, order)
        if method == "awq":
            packed[f"{prefix}.qweight"], packed[f"{prefix}.qzeros"] = pack_awq(q, zeros)
        else:
            packed[f"{prefix}.qweight"], packed[f"{prefix}.qzeros"] = pack_gptq(
                q, zeros, bits, v1=checkpoint_format == "gptq")
            packed[f"{prefix}.g_idx"] = g_idx
        packed[f"{prefix}.scales"] = scales
        floats[name] = dequantized(q, zeros, scales, g_idx)
    config = json.loads((model_dir / "config.json").read_text())
    quant = ({"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
              "version": "gemm"} if method == "awq" else
             {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
              "desc_act": act_order, "checkpoint_format": checkpoint_format})
    for out, weights, extra in ((packed_dir, packed, {"quantization_config": quant,
                                                      "torch_dtype": "float16"}),
                                (float_dir, floats, {"torch_dtype": "float32"})):
        shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(weights, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
    return packed_dir, float_dir

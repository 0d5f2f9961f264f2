"""The paths a model with 8-bit projections runs through, for the quantized-weight tests: the
compiled decode step, the layer-by-layer forward, and that forward on the torch reference of
the 8-bit GEMM's arithmetic (kernels/reference.py `linear_q8_0`)."""

from __future__ import annotations

import torch

from pagedserve_kernels import cpu_quant, reference
from server import LLM, SamplingParams
from server.models.layers.linear import Linear

SMALL_CACHE = 1 << 22
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def unpack(packed: torch.Tensor, out_features: int) -> tuple[torch.Tensor, ...]:
    """pack_blocks's tiles, 8- or 4-bit -> (scales [out, in / 32], values [out, in], offsets)."""
    nb, kb, _ = packed.shape
    width = 256 if cpu_quant.is_four_bit(packed) else 512
    if width == 256:  # groups j (low nibbles) and j + 4 (high) share a byte
        nibbles = packed[..., :256].reshape(nb, kb, 4, 16, 4)
        values = torch.cat([nibbles & 0xF, nibbles >> 4], dim=2).view(torch.int8)
    else:
        values = packed[..., :512].contiguous().view(torch.int8).view(nb, kb, 8, 16, 4)
    values = values.permute(0, 3, 1, 2, 4).reshape(nb * 16, kb * 32)
    scales = packed[..., width:width + 32].contiguous().view(torch.float16).permute(0, 2, 1)
    mins = packed[..., width + 64:width + 96].contiguous().view(torch.float16).permute(0, 2, 1)
    return (scales.reshape(nb * 16, kb)[:out_features], values[:out_features],
            mins.reshape(nb * 16, kb)[:out_features])


def torch_arithmetic(monkeypatch) -> None:
    """The 8-bit GEMM replaced by the torch reference of its arithmetic."""
    def linear_q8_0(x, packed, bias, out_features):
        scales, values, mins = unpack(packed, out_features)
        return reference.linear_q8_0(x, scales, values, bias, mins)

    monkeypatch.setattr(cpu_quant, "linear_q8_0", linear_q8_0)


def run(path, prompts, **kwargs):
    llm = LLM(str(path), kv_cache_memory=SMALL_CACHE, dtype="float32", **kwargs)
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def projections(llm) -> list:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]


def check_paths(path, prompts, monkeypatch, compiled: bool = True, **kwargs):
    """The compiled decode step (8-bit projections in its fp32 GEMMs; `compiled`: whether it
    takes the model), the layer-by-layer forward, and that forward on the torch reference of the
    8-bit GEMM: the same tokens. Returns the first run's LLM."""
    llm, tokens = run(path, prompts, **kwargs)
    assert (llm.engine.runner.compiled_step is not None) == compiled
    assert run(path, prompts, compiled_decode=False, **kwargs)[1] == tokens
    with monkeypatch.context() as m:
        torch_arithmetic(m)
        assert run(path, prompts, compiled_decode=False, **kwargs)[1] == tokens
    return llm

"""The compiled CPU decode step's parts, measured by difference (it is one C++ call, so
torch.profiler sees none of its inside): the step at --batch-size sequences of --context tokens,
the same step with every context cut to one token (what remains without attention's K/V
reads), and the logits GEMM that follows a step. Random K/V over shuffled cache blocks; a
command, not part of the test run:

    python -m server.bench.decode_parts --model DIR --batch-size 64 --context 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from kernels import cpu_decoder
from server.models.arch_config import ArchConfig
from server.models.layers.linear import pack_linear_weights
from server.models.llama import DecoderLayer, LlamaModel, use_compiled_decode, use_fused_cpu_ops
from server.models.loader import load_model


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(model_dir: Path, batch_size: int, context: int, block_size: int = 16,
            repeats: int = 10, seed: int = 0) -> dict[str, float]:
    arch = ArchConfig.from_model_dir(model_dir)
    model = load_model(model_dir, arch, torch.float32, torch.device("cpu"),
                       max_position=max(context, arch.max_position_embeddings))
    use_fused_cpu_ops(model)
    pack_linear_weights(model, small=True)
    if not use_compiled_decode(model):
        raise SystemExit("the compiled decode step is not available here (no C++ compiler?)")
    gen = torch.Generator().manual_seed(seed)
    width = -(-context // block_size)
    num_blocks = batch_size * width
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(arch.num_layers)]
    table = torch.randperm(num_blocks, generator=gen).view(batch_size, width).to(torch.int32)
    lens = torch.full((batch_size,), context, dtype=torch.int32)
    positions = lens.long() - 1
    slots = (table[torch.arange(batch_size), positions // block_size].long() * block_size
             + positions % block_size)
    inner = cast(LlamaModel, model.model)
    tensors = inner._decoder_tensors(caches)
    hidden = torch.randn(batch_size, arch.hidden_size, generator=gen)
    cos, sin = inner.rotary.cos_sin(positions, torch.float32)
    attn = cast(DecoderLayer, inner.layers[0]).self_attn
    ones = torch.ones(batch_size, dtype=torch.int32)

    def step(seq_lens: torch.Tensor) -> torch.Tensor:
        return cpu_decoder.decode_step(tensors, hidden, cos, sin, slots, table, seq_lens,
                                       attn.scale, attn.sliding_window)

    with torch.inference_mode():
        full = median_ms(lambda: step(lens), repeats)
        short = median_ms(lambda: step(ones), repeats)
        logits = median_ms(lambda: model.compute_logits(hidden),  # type: ignore[operator]
                           repeats)
    return {"step_ms": full, "step_1_token_ms": short, "attention_ms": full - short,
            "logits_ms": logits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=200, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    r = measure(args.model, args.batch_size, args.context, repeats=args.repeats)
    print(f"decode step, {args.batch_size} x {args.context} tokens: {r['step_ms']:.1f} ms; "
          f"with 1-token contexts {r['step_1_token_ms']:.1f} ms (attention ~"
          f"{r['attention_ms']:.1f} ms); logits GEMM {r['logits_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The compiled CPU decode step's parts, measured by difference (it is one C++ call, so
torch.profiler sees none of its inside): the step at --batch-size sequences of --context tokens,
the same step with every context cut to one token (what remains without attention's K/V
reads), and the logits GEMM that follows a step. Random K/V over shuffled cache blocks; a
command, not part of the test run:

    python -m server.bench.decode_parts --model DIR --batch-size 64 --context 200
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from pagedserve_kernels import cpu_decoder
from server.config import ModelConfig
from server.model_runner.cpu import KernelChoice, compiled_decode_step
from server.models.base import ModelOptions
from server.models.layers.linear import pack_linear_weights
from server.models.layers.packed_gemm import GemmPolicy, median_time
from server.models.loader import load_model
from server.models.registry import read_arch_config


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_time(fn, repeats)


def measure(model_dir: Path, batch_size: int, context: int, block_size: int = 16,
            repeats: int = 10, seed: int = 0) -> dict[str, float]:
    arch = read_arch_config(model_dir)
    options = ModelOptions(max_position=max(context, arch.max_position_embeddings),
                           kernel_backend="cpu")
    model = load_model(model_dir, arch, options, torch.device("cpu"))
    pack_linear_weights(model, policy=GemmPolicy(own=True))
    gen = torch.Generator().manual_seed(seed)
    width = -(-context // block_size)
    num_blocks = batch_size * width
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(arch.num_layers)]
    step_config = ModelConfig(model=str(model_dir), attention_backend="cpu")
    compiled, reason = compiled_decode_step(model, step_config,
                                            KernelChoice("cpu", "cpu", native=True), caches)
    if compiled is None:
        raise SystemExit(f"the compiled decode step is not available here: {reason}")
    table = torch.randperm(num_blocks, generator=gen).view(batch_size, width).to(torch.int32)
    lens = torch.full((batch_size,), context, dtype=torch.int32)
    positions = lens.long() - 1
    slots = (table[torch.arange(batch_size), positions // block_size].long() * block_size
             + positions % block_size)
    hidden = torch.randn(batch_size, arch.hidden_size, generator=gen)
    export = compiled.export
    cos, sin = export.rotary.cos_sin(positions, torch.float32)
    ones = torch.ones(batch_size, dtype=torch.int32)

    def step(seq_lens: torch.Tensor) -> torch.Tensor:
        return cpu_decoder.decode_step(compiled.tensors, hidden, cos, sin, slots, table,
                                       seq_lens, export.scale, export.sliding_window)

    with torch.inference_mode():
        full = median_ms(lambda: step(lens), repeats)
        short = median_ms(lambda: step(ones), repeats)
        logits = median_ms(lambda: model.compute_logits(hidden), repeats)
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

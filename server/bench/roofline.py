"""`pagedserve bench roofline`: what this machine allows a model's workload at best, on CPU.

Measures, on the CPU:
* the fp32 FMA peak: chains of vector FMAs on registers on every thread (kernels/cpu_peak.py),
  the machine's FLOP ceiling, whatever a library reaches; for bf16 also the AVX512_BF16
  dot-product peak (chains of vdpbf16ps), where the CPU has it: a bf16 GEMM's ceiling there
  (AMX tiles, on the CPUs that have them, go past it and are not measured by a loop);
* memory read bandwidth: `x.sum()` over a tensor far larger than the caches (GB/s);
* matrix-multiply rate at large square sizes (n x n @ n x n) and at the model's own GEMM
  shapes for a batch of M tokens — per layer qkv (H -> q+2kv), o_proj (q -> H), gate_up
  (H -> 2I), down (I -> H), then lm_head (H -> V) — through distinct weights for every layer,
  called in layer order so the weights stream from memory as they do in a real forward pass;
* the same shapes on each GEMM kind the server chooses from (F.linear, MKL's and oneDNN's
  prepacked linears, the own compiled tiles), timed as its start-up choice times them
  (layers/packed_gemm.py's `measure`), and at each shape's fastest kind: what one library
  reaches is not what the machine allows (MKL on AMD CPUs runs at a fraction of oneDNN's rate).
Every figure is the best of several runs (`--iters`, `--min-time`) in each of `--rounds`
rounds, each model GEMM call timed on its own: other load on the machine only slows a call
down.

Counts, from config.json (P_layers = matmul weights of all decoder layers, P_head = V x H):
* weight bytes per decode step = (all decoder-layer parameters + final norm + P_head) x dtype
  size (the embedding lookup reads M rows, not the table; a tied table is read once, as lm_head);
* FLOPs per prompt token = 2 P_layers + 4 L n_heads d_head c_prompt, c_prompt = (in + 1) / 2;
* FLOPs per output token = 2 (P_layers + P_head) + 4 L n_heads d_head c_output,
  c_output = in + (out + 1) / 2 (output token i attends to in + i + 1 keys);
  4 L n_heads d_head c is QK^T plus PV over c keys; contexts are capped by a sliding window.
  Norms, activations, rotary and softmax are not counted. Prompt tokens need no lm_head: the
  last prompt position's logits are the first output token's, counted there.
Ceilings:
* decode tok/s at concurrency 1 = bandwidth / weight bytes per step (KV-cache reads are printed
  but left out, as are compute and overheads);
* output tok/s at large concurrency = FLOP rate / (FLOPs per output token
  + FLOPs per prompt token x in / out), at the dtype's peak (bf16: the dot-product loop's where
  the CPU has AVX512_BF16, else the FMA loop's; the best GEMM where no loop can be built), at
  the best GEMM measured anywhere, at the best kind per model shape, and at the best rate of
  the model's GEMMs through F.linear (over the M measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pagedserve_kernels import cpu_peak
from server.bench.args import parse_ints
from server.config import DTYPES
from server.models.arch_config import ArchConfig
from server.models.layers import packed_gemm
from server.models.registry import read_arch_config

_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}
_GB = 1e9


@dataclass(frozen=True)
class Gemm:
    name: str
    out_features: int  # N: weight [N, K], as nn.Linear stores it
    in_features: int  # K
    count: int  # how many per forward pass (num_layers, or 1 for lm_head)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count


@dataclass(frozen=True)
class Counts:
    num_params: int
    layer_matmul_params: int  # P_layers, all layers
    lm_head_params: int  # P_head
    bytes_per_param: int
    weight_bytes_per_step: int
    kv_bytes_per_step: float  # one sequence at the mean output context
    attention_flops_per_key: int  # 4 L n_heads d_head
    mean_prompt_context: float
    mean_output_context: float
    flops_per_prompt_token: float
    flops_per_output_token: float


def gemm_shapes(arch: ArchConfig) -> list[Gemm]:
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, i, n = arch.hidden_size, arch.intermediate_size, arch.num_layers
    return [Gemm("qkv", q_size + 2 * kv_size, h, n), Gemm("o_proj", h, q_size, n),
            Gemm("gate_up", 2 * i, h, n), Gemm("down", h, i, n),
            Gemm("lm_head", arch.vocab_size, h, 1)]


def mean_context(first: int, last: int, window: int | None) -> float:
    """Mean over c = first..last of min(c, window): keys attended by a token that sees c."""
    num = last - first + 1
    if window is None or last <= window:
        return (first + last) / 2
    if first > window:
        return float(window)
    below = window - first + 1  # c = first..window
    return ((first + window) / 2 * below + window * (num - below)) / num


def count_workload(arch: ArchConfig, input_len: int, output_len: int,
                   bytes_per_param: int) -> Counts:
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    gemms = gemm_shapes(arch)
    layer_matmul = sum(g.params for g in gemms if g.name != "lm_head")
    head = arch.vocab_size * arch.hidden_size
    h, i = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer_other = (2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
                       + (q_size + 2 * kv_size if arch.qkv_bias else 0)
                       + (h if arch.o_bias else 0) + (2 * i + h if arch.mlp_bias else 0))
    read_per_step = layer_matmul + arch.num_layers * per_layer_other + h + head
    num_params = read_per_step + (0 if arch.tie_word_embeddings else head)
    attn_per_key = 4 * arch.num_layers * q_size
    window = arch.sliding_window
    c_prompt = mean_context(1, input_len, window)
    c_output = mean_context(input_len + 1, input_len + output_len, window)
    kv_bytes = 2 * arch.num_layers * kv_size * c_output * bytes_per_param
    return Counts(num_params=num_params, layer_matmul_params=layer_matmul, lm_head_params=head,
                  bytes_per_param=bytes_per_param,
                  weight_bytes_per_step=read_per_step * bytes_per_param,
                  kv_bytes_per_step=kv_bytes, attention_flops_per_key=attn_per_key,
                  mean_prompt_context=c_prompt, mean_output_context=c_output,
                  flops_per_prompt_token=2 * layer_matmul + attn_per_key * c_prompt,
                  flops_per_output_token=2 * (layer_matmul + head) + attn_per_key * c_output)


def decode_ceiling(counts: Counts, bandwidth: float) -> float:
    """Output tok/s of one sequence when every step reads all weights at `bandwidth` B/s."""
    return bandwidth / counts.weight_bytes_per_step


def throughput_ceiling(counts: Counts, flops_per_s: float, input_len: int,
                       output_len: int) -> float:
    """Output tok/s when only matmul FLOPs count, prompts included."""
    per_output = (counts.flops_per_output_token
                  + counts.flops_per_prompt_token * input_len / output_len)
    return flops_per_s / per_output


# ---- measurements ----------------------------------------------------------------------------

def best_seconds(fn: Callable[[], object], iters: int, warmup: int,
                 min_seconds: float = 0.0) -> float:
    """Fastest of at least `iters` timed calls, going on until `min_seconds` have been spent
    timing (at most 100 calls): a busy machine only ever slows a call down."""
    return best_seconds_each([fn], iters, warmup, min_seconds)[0]


def best_seconds_each(fns: list[Callable[[], object]], iters: int, warmup: int,
                      min_seconds: float = 0.0) -> list[float]:
    """Calls `fns` in order, pass after pass, and keeps each one's fastest call: one
    preempted call (a stalled thread barrier on a shared machine) spoils only itself."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best, spent, passes = [float("inf")] * len(fns), 0.0, 0
    while passes < max(iters, 1) or (spent < min_seconds and passes < 100):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[k], spent = min(best[k], elapsed), spent + elapsed
        passes += 1
    return best


def measure_bandwidth(num_bytes: int, iters: int, warmup: int, min_seconds: float = 0.0) -> float:
    """Bytes per second read by `x.sum()` over a float32 tensor of `num_bytes`."""
    x = torch.ones(max(num_bytes // 4, 1), dtype=torch.float32)
    return x.numel() * 4 / best_seconds(x.sum, iters, warmup, min_seconds)


def measure_square(n: int, dtype: torch.dtype, iters: int, warmup: int,
                   min_seconds: float = 0.0) -> float:
    """FLOP/s of an n x n @ n x n matmul."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=c), iters, warmup, min_seconds)


@dataclass
class GemmRow:
    num_tokens: int  # M
    gflops_per_s: dict[str, float]  # per GEMM kind, over all layers
    all_gflops_per_s: float  # whole forward's matmuls
    forward_ms: float
    weight_gb_per_s: float  # matmul weight bytes / forward time


def make_weights(gemms: list[Gemm], dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """Distinct random weights for every layer (so they stream from memory, not cache)."""
    gen = torch.Generator().manual_seed(0)
    return {g.name: [torch.empty(g.out_features, g.in_features, dtype=dtype).normal_(
        0.0, 0.02, generator=gen) for _ in range(g.count)] for g in gemms}


def measure_gemm_calls(gemms: list[Gemm], weights: dict[str, list[torch.Tensor]],
                       num_tokens: int, dtype: torch.dtype, iters: int, warmup: int,
                       min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Best seconds of every layer's call of every GEMM kind, for a batch of `num_tokens`.
    The calls run in a forward pass's order (layer by layer, then lm_head), so every pass
    streams all the weights, as a real forward does, however large the caches."""
    inputs = {g.name: torch.randn(num_tokens, g.in_features).to(dtype) for g in gemms}
    outputs = {g.name: torch.empty(num_tokens, g.out_features, dtype=dtype) for g in gemms}
    order = [(g.name, layer) for layer in range(max(g.count for g in gemms))
             for g in gemms if layer < g.count]
    calls = [lambda w=weights[name][layer], x=inputs[name], out=outputs[name]:
             torch.mm(x, w.t(), out=out) for name, layer in order]
    best = best_seconds_each(calls, iters, warmup, min_seconds)
    seconds: dict[str, list[float]] = {g.name: [] for g in gemms}
    for (name, _), s in zip(order, best):
        seconds[name].append(s)
    return seconds


def gemm_row(gemms: list[Gemm], num_tokens: int, call_seconds: dict[str, list[float]],
             bytes_per_param: int) -> GemmRow:
    rates, total_s, total_flops = {}, 0.0, 0
    for g in gemms:
        seconds = sum(call_seconds[g.name])
        flops = 2 * num_tokens * g.params
        rates[g.name] = flops / seconds / _GB
        total_s += seconds
        total_flops += flops
    weight_bytes = sum(g.params for g in gemms) * bytes_per_param
    return GemmRow(num_tokens, rates, total_flops / total_s / _GB, total_s * 1e3,
                   weight_bytes / total_s / _GB)


def library_rates(gemms: list[Gemm], dtype: torch.dtype,
                  num_tokens: list[int]) -> dict[int, dict[str, float]]:
    """GFLOP/s of a forward's matmuls at each M on each GEMM kind the server may choose
    (layers/packed_gemm.py: F.linear, MKL's and oneDNN's prepacked linears, the own tiles),
    timed as its start-up choice times them, and "best": each shape on its fastest kind."""
    kinds = packed_gemm.candidates(dtype, packed_gemm.GemmPolicy(own=True))
    bounds = tuple(num_tokens)
    seconds = {g.name: packed_gemm.measure(g.in_features, g.out_features, dtype, kinds, bounds)
               for g in gemms}
    found = [k for k in kinds if all(k in seconds[g.name] for g in gemms)]
    rates: dict[int, dict[str, float]] = {}
    for i, m in enumerate(num_tokens):
        flops = sum(2 * m * g.params for g in gemms)
        row = {k: flops / sum(g.count * seconds[g.name][k][i] for g in gemms) / _GB
               for k in found}
        row["best"] = flops / sum(g.count * min(t[i] for t in seconds[g.name].values())
                                  for g in gemms) / _GB
        rates[m] = row
    return rates


def _merge_min(a: dict[str, list[float]] | None,
               b: dict[str, list[float]]) -> dict[str, list[float]]:
    return b if a is None else {k: [min(x, y) for x, y in zip(a[k], b[k])] for k in b}


# ---- report ----------------------------------------------------------------------------------

def describe(arch: ArchConfig, counts: Counts, input_len: int, output_len: int,
             dtype_name: str) -> str:
    c = counts
    n, qd = arch.num_layers, arch.num_heads * arch.head_dim
    return "\n".join([
        f"{arch.architecture}: {n} layers, hidden {arch.hidden_size}, heads {arch.num_heads}/"
        f"{arch.num_kv_heads} x {arch.head_dim}, intermediate {arch.intermediate_size}, vocab "
        f"{arch.vocab_size}, {'tied' if arch.tie_word_embeddings else 'untied'} embeddings, "
        f"{dtype_name}",
        f"parameters {c.num_params:,}; weight bytes per decode step "
        f"{c.weight_bytes_per_step / _GB:.4f} GB; KV-cache bytes per sequence and step "
        f"{c.kv_bytes_per_step / _GB:.4f} GB at mean context {c.mean_output_context:g} "
        f"(not in the ceiling)",
        f"FLOPs per prompt token {c.flops_per_prompt_token / _GB:.4f} G = 2 x "
        f"{c.layer_matmul_params:,} + 4 x {n} x {qd} x {c.mean_prompt_context:g}",
        f"FLOPs per output token {c.flops_per_output_token / _GB:.4f} G = 2 x "
        f"({c.layer_matmul_params:,} + {c.lm_head_params:,}) + 4 x {n} x {qd} x "
        f"{c.mean_output_context:g}",
        f"workload: {input_len} prompt + {output_len} output tokens per request",
    ])


def format_gemm_table(rows: list[GemmRow], names: list[str]) -> str:
    head = f"{'M':>5s} " + " ".join(f"{n:>8s}" for n in names)
    lines = ["model GEMMs, GFLOP/s (all layers' weights):",
             f"{head} {'all':>8s} {'ms/fwd':>8s} {'wt GB/s':>8s}"]
    for r in rows:
        lines.append(f"{r.num_tokens:5d} " + " ".join(f"{r.gflops_per_s[n]:8.1f}" for n in names)
                     + f" {r.all_gflops_per_s:8.1f} {r.forward_ms:8.2f} {r.weight_gb_per_s:8.2f}")
    return "\n".join(lines)


def format_library_table(rates: dict[int, dict[str, float]]) -> str:
    kinds = list(next(iter(rates.values())))
    lines = ["GEMM kinds at the model's shapes, GFLOP/s over a forward's matmuls (weights "
             "streaming; best: each shape on its fastest kind, as the server chooses):",
             f"{'M':>5s} " + " ".join(f"{k:>8s}" for k in kinds)]
    for m, row in rates.items():
        lines.append(f"{m:5d} " + " ".join(f"{row[k]:8.1f}" for k in kinds))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory "
                        "(only config.json is read)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, i.e. the cores)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype of weights and matmuls; auto takes config.json's")
    parser.add_argument("--batch-tokens", type=parse_ints, default=[1, 8, 32, 64, 128, 256, 512],
                        metavar="M,...", help="token counts M for the model-GEMM table")
    parser.add_argument("--square-sizes", type=parse_ints, default=[1024, 2048],
                        metavar="N,...", help="n for the n x n x n matmuls")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="size of the tensor summed for the bandwidth figure")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per figure (best kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.25, metavar="SECONDS",
                        help="keep timing a figure until this long has been spent (at most "
                             "100 runs) in each round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure everything this many times, keeping each figure's best")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results")


def main(args) -> int:
    arch = read_arch_config(Path(args.model))
    dtype_name = arch.torch_dtype if args.dtype == "auto" else args.dtype
    if dtype_name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype_name!r}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        raise ValueError("--rounds and --iters must be >= 1 and --warmup >= 0")
    dtype = _DTYPES[dtype_name]
    counts = count_workload(arch, args.input_len, args.output_len,
                            torch.empty((), dtype=dtype).element_size())
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = _measure(arch, counts, dtype, args)
    finally:
        torch.set_num_threads(previous_threads)
    result.update(model=str(args.model), dtype=dtype_name, input_len=args.input_len,
                  output_len=args.output_len, counts=asdict(counts))
    print(describe(arch, counts, args.input_len, args.output_len, dtype_name))
    print(f"threads {result['threads']} | torch {torch.__version__} | {platform.machine()} | "
          f"load average (1 min) {result['load_average_before']:.2f} before, "
          f"{result['load_average_after']:.2f} after (other work skews the figures)")
    print(f"memory read bandwidth (sum of {args.bandwidth_mib} MiB): "
          f"{result['bandwidth_gb_per_s']:.2f} GB/s")
    fma = result["ceilings"]["fma_peak_gflops_per_s"]
    print(f"fp32 FMA peak (vector FMA loop, {result['threads']} threads): "
          + (f"{fma:.1f} GFLOP/s" if fma else "not measured (no C++ compiler)"))
    if dtype == torch.bfloat16:
        dot = result["ceilings"]["bf16_dot_peak_gflops_per_s"]
        print(f"bf16 dot-product peak (vdpbf16ps loop, {result['threads']} threads): "
              + (f"{dot:.1f} GFLOP/s" if dot else "not measured (no AVX512_BF16)"))
    print("square matmuls: " + ", ".join(f"n={n}: {v:.1f} GFLOP/s"
                                         for n, v in result["square_gflops_per_s"].items()))
    print(format_gemm_table([GemmRow(**r) for r in result["gemms"]],
                            [g.name for g in gemm_shapes(arch)]))
    print(format_library_table({int(m): r for m, r in result["library_gflops_per_s"].items()}))
    print(format_ceilings(result["ceilings"], args.input_len, args.output_len))
    print(f"measured in {result['elapsed_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _measure(arch: ArchConfig, counts: Counts, dtype: torch.dtype, args) -> dict:
    start, load_before = time.perf_counter(), _load_average()
    iters, warmup, min_s = args.iters, args.warmup, args.min_time
    gemms = gemm_shapes(arch)
    weights = make_weights(gemms, dtype)
    # Rounds spread each figure's samples over time, so a burst of other work on the machine
    # spoils one round's sample, not the figure; every figure keeps its best round.
    bandwidth, squares, fma, dot = 0.0, dict.fromkeys(args.square_sizes, 0.0), 0.0, 0.0
    calls: dict[int, dict[str, list[float]] | None] = dict.fromkeys(args.batch_tokens)
    for _ in range(args.rounds):
        bandwidth = max(bandwidth, measure_bandwidth(args.bandwidth_mib << 20, iters, warmup,
                                                     min_s))
        fma = max(fma, cpu_peak.fma_peak_flops(max(min_s, 0.02)) or 0.0)
        if dtype == torch.bfloat16:
            dot = max(dot, cpu_peak.bf16_dot_peak_flops(max(min_s, 0.02)) or 0.0)
        for n in squares:
            squares[n] = max(squares[n], measure_square(n, dtype, iters, warmup, min_s) / _GB)
        for m in calls:
            calls[m] = _merge_min(calls[m], measure_gemm_calls(gemms, weights, m, dtype, iters,
                                                               warmup, min_s))
    del weights
    libraries = library_rates(gemms, dtype, list(args.batch_tokens))
    best_library = max(r["best"] for r in libraries.values())
    rows = [gemm_row(gemms, m, c, counts.bytes_per_param) for m, c in calls.items()]
    best_row = max(rows, key=lambda r: r.all_gflops_per_s)
    best_gemm = max([*squares.values(), *(r.all_gflops_per_s for r in rows), best_library])
    peak = (dot or fma) / _GB or best_gemm
    one = next((r for r in rows if r.num_tokens == 1), None)
    ceilings = {
        "decode_tok_s_concurrency_1": decode_ceiling(counts, bandwidth),
        "decode_tok_s_concurrency_1_from_m1_gemms": 1e3 / one.forward_ms if one else None,
        "output_tok_s_large_concurrency": throughput_ceiling(
            counts, peak * _GB, args.input_len, args.output_len),
        "output_tok_s_large_concurrency_at_model_gemms": throughput_ceiling(
            counts, best_row.all_gflops_per_s * _GB, args.input_len, args.output_len),
        "peak_gflops_per_s": peak,
        "peak_kind": "bf16 dot peak" if dot else "FMA peak" if fma else "best GEMM measured",
        "fma_peak_gflops_per_s": fma / _GB or None,
        "bf16_dot_peak_gflops_per_s": dot / _GB or None,
        "best_gemm_gflops_per_s": best_gemm,
        "output_tok_s_large_concurrency_at_best_gemm": throughput_ceiling(
            counts, best_gemm * _GB, args.input_len, args.output_len),
        "best_library_gflops_per_s": best_library,
        "output_tok_s_large_concurrency_at_best_library": throughput_ceiling(
            counts, best_library * _GB, args.input_len, args.output_len),
        "model_gemm_tokens": best_row.num_tokens,
        "model_gemm_gflops_per_s": best_row.all_gflops_per_s,
        "bandwidth_gb_per_s": bandwidth / _GB,
    }
    return {"threads": torch.get_num_threads(), "bandwidth_gb_per_s": bandwidth / _GB,
            "square_gflops_per_s": squares, "gemms": [asdict(r) for r in rows],
            "library_gflops_per_s": libraries,
            "ceilings": ceilings, "elapsed_s": time.perf_counter() - start,
            "load_average_before": load_before, "load_average_after": _load_average()}


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


def format_ceilings(c: dict, input_len: int, output_len: int) -> str:
    lines = [
        "ceilings:",
        f"  decode at concurrency 1: {c['bandwidth_gb_per_s']:.2f} GB/s / weight bytes per step"
        f" = {c['decode_tok_s_concurrency_1']:.1f} tok/s",
    ]
    if c["decode_tok_s_concurrency_1_from_m1_gemms"] is not None:
        lines.append(f"    (one M=1 pass of the model's GEMMs: "
                     f"{c['decode_tok_s_concurrency_1_from_m1_gemms']:.1f} tok/s)")
    lines += [
        f"  output at large concurrency: {c['peak_gflops_per_s']:.1f} GFLOP/s "
        f"({c['peak_kind']}) / "
        f"(FLOPs per output token + FLOPs per prompt token x {input_len}/{output_len}) = "
        f"{c['output_tok_s_large_concurrency']:.1f} tok/s",
        f"    (at the best GEMM measured, {c['best_gemm_gflops_per_s']:.1f} GFLOP/s: "
        f"{c['output_tok_s_large_concurrency_at_best_gemm']:.1f} tok/s)",
        f"    (at the best GEMM kind per model shape, {c['best_library_gflops_per_s']:.1f} "
        f"GFLOP/s: {c['output_tok_s_large_concurrency_at_best_library']:.1f} tok/s)",
        f"    (at the model's GEMMs through F.linear, best at M={c['model_gemm_tokens']}: "
        f"{c['model_gemm_gflops_per_s']:.1f} GFLOP/s -> "
        f"{c['output_tok_s_large_concurrency_at_model_gemms']:.1f} tok/s)",
    ]
    return "\n".join(lines)

"""`pagedserve bench kernels`: correctness and speed of the Triton kernels on CUDA.

Checks both kernels against kernels/reference.py at realistic sizes, then times
`paged_attention` (decode: batch x context; prefill: whole prompts) and `reshape_and_cache`
with CUDA events (median after warm-up), against torch SDPA on the same K/V gathered into
contiguous tensors, and reports achieved memory bandwidth as a fraction of a device-to-device
copy measured in the same run. `--dry-run` builds and checks the plan without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass

import torch

from server.bench.args import parse_ints

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_CACHE_TOKENS = 1 << 22  # cases whose K/V would exceed this many tokens are skipped


@dataclass
class Case:
    kind: str  # "decode" | "prefill" | "cache_write"
    batch: int
    context: int  # decode: context per sequence; prefill: prompt tokens; cache_write: tokens


@dataclass
class Result:
    kind: str
    batch: int
    context: int
    triton_ms: float
    sdpa_ms: float | None
    speedup_vs_sdpa: float | None
    gb_per_s: float
    fraction_of_copy: float


def plan(args) -> tuple[list[Case], list[Case]]:
    """(cases to run, cases skipped for memory)."""
    cases: list[Case] = []
    skipped: list[Case] = []
    for batch in args.decode_batches:
        for context in args.decode_contexts:
            case = Case("decode", batch, context)
            (skipped if batch * context > MAX_CACHE_TOKENS else cases).append(case)
    cases += [Case("prefill", 1, tokens) for tokens in args.prefill_tokens]
    cases += [Case("cache_write", 1, tokens) for tokens in args.prefill_tokens]
    return cases, skipped


def check_config(args) -> None:
    if args.num_heads % args.num_kv_heads:
        raise ValueError(f"--num-heads ({args.num_heads}) must be a multiple of "
                         f"--num-kv-heads ({args.num_kv_heads})")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise ValueError(f"--block-size must be a power of two >= 16, got {args.block_size}")
    if args.iters < 1 or args.warmup < 0:
        raise ValueError("--iters must be >= 1 and --warmup >= 0")


PagedInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor]  # query, key/value caches, block_table, seq_lens, query_start_loc


def _paged_inputs(batch: int, q_lens: list[int], context: int, args, device,
                  dtype) -> PagedInputs:
    bs = args.block_size
    blocks_per_seq = -(-context // bs)
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (num_blocks, bs, args.num_kv_heads, args.head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    block_table = perm.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn((sum(q_lens), args.num_heads, args.head_dim), generator=gen,
                    device=device, dtype=dtype)
    qsl = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.tensor(q_lens, device=device).cumsum(0)
    return q, key_cache, value_cache, block_table, seq_lens, qsl


def _gather(key_cache, block_table, context):
    """[batch, heads, context, dim] contiguous copy of each sequence's K (or V)."""
    batch = block_table.shape[0]
    k = key_cache[block_table.long()].reshape(batch, -1, *key_cache.shape[2:])[:, :context]
    return k.permute(0, 2, 1, 3).contiguous()


def _time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device, iters: int, warmup: int) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters, warmup)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def check_correctness(args, device, dtype) -> list[str]:
    from pagedserve_kernels import ops
    failures = []
    scale = args.head_dim ** -0.5
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, q_lens, context in (("decode", [1] * 8, 4096), ("mixed", [1, 1, 300, 1], 2048),
                                  ("prefill", [2048], 2048)):
        inputs = _paged_inputs(len(q_lens), q_lens, context, args, device, dtype)
        ref = ops.paged_attention(*inputs, scale, backend="torch")
        for splits in (1, None, 8) if name == "decode" else (1,):
            out = ops.paged_attention(*inputs, scale, backend="triton", num_splits=splits)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            status = "ok" if err < tol else "FAIL"
            print(f"correctness {name:8s} splits={splits}: rel err {err:.2e} {status}")
            if err >= tol:
                failures.append(f"{name} splits={splits}: {err:.2e}")
    return failures


def run_case(case: Case, args, device, dtype, copy_gbs: float) -> Result:
    import torch.nn.functional as F

    from pagedserve_kernels import ops
    scale = args.head_dim ** -0.5
    elem = torch.empty((), dtype=dtype).element_size()
    kv_bytes_per_token = 2 * args.num_kv_heads * args.head_dim * elem
    if case.kind == "cache_write":
        n = case.context
        key = torch.randn((n, args.num_kv_heads, args.head_dim), device=device, dtype=dtype)
        value = torch.randn_like(key)
        num_blocks = -(-n // args.block_size)
        cache_shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
        key_cache = torch.empty(cache_shape, device=device, dtype=dtype)
        value_cache = torch.empty_like(key_cache)
        slots = torch.randperm(num_blocks * args.block_size, device=device)[:n]
        ms = _time_ms(lambda: ops.reshape_and_cache(key, value, key_cache, value_cache,
                                                        slots, backend="triton"),
                      args.iters, args.warmup)
        gbs = 2 * n * kv_bytes_per_token / (ms * 1e-3) / 1e9  # read + write
        return Result(case.kind, 1, n, ms, None, None, gbs, gbs / copy_gbs)
    q_lens = [1] * case.batch if case.kind == "decode" else [case.context]
    inputs = _paged_inputs(case.batch, q_lens, case.context, args, device, dtype)
    q, key_cache, value_cache, block_table = inputs[:4]
    out = torch.empty_like(q)
    ms = _time_ms(lambda: ops.paged_attention(*inputs, scale, out=out, backend="triton"),
                  args.iters, args.warmup)
    k = _gather(key_cache, block_table, case.context)
    v = _gather(value_cache, block_table, case.context)
    if case.kind == "decode":
        q4 = q.view(case.batch, 1, args.num_heads, args.head_dim).transpose(1, 2)
        sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale,  # noqa: E731
                                                      enable_gqa=True)
    else:
        q4 = q.view(1, -1, args.num_heads, args.head_dim).transpose(1, 2)
        sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale,  # noqa: E731
                                                      is_causal=True, enable_gqa=True)
    sdpa_ms = _time_ms(sdpa, args.iters, args.warmup)
    bytes_read = case.batch * case.context * kv_bytes_per_token + 2 * q.numel() * elem
    gbs = bytes_read / (ms * 1e-3) / 1e9
    return Result(case.kind, case.batch, case.context, ms, sdpa_ms, sdpa_ms / ms, gbs,
                  gbs / copy_gbs)


def format_results(results: list[Result], copy_gbs: float) -> str:
    lines = [f"device-to-device copy: {copy_gbs:.0f} GB/s",
             f"{'kind':12s} {'batch':>5s} {'tokens':>7s} {'triton ms':>10s} {'sdpa ms':>9s} "
             f"{'vs sdpa':>8s} {'GB/s':>7s} {'of copy':>8s}"]
    for r in results:
        sdpa = f"{r.sdpa_ms:9.3f}" if r.sdpa_ms is not None else f"{'-':>9s}"
        speed = f"{r.speedup_vs_sdpa:7.2f}x" if r.speedup_vs_sdpa is not None else f"{'-':>8s}"
        lines.append(f"{r.kind:12s} {r.batch:5d} {r.context:7d} {r.triton_ms:10.3f} {sdpa} "
                     f"{speed} {r.gb_per_s:7.0f} {100 * r.fraction_of_copy:7.1f}%")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--decode-batches", type=parse_ints, default=[1, 8, 32, 128, 256])
    parser.add_argument("--decode-contexts", type=parse_ints,
                        default=[512, 2048, 8192, 32768])
    parser.add_argument("--prefill-tokens", type=parse_ints, default=[1, 1024, 4096, 16384])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the arguments and print the plan; needs no GPU")


def main(args) -> int:
    check_config(args)
    cases, skipped = plan(args)
    for case in skipped:
        print(f"skip {case.kind} batch={case.batch} context={case.context}: more than "
              f"{MAX_CACHE_TOKENS} cached tokens")
    if args.dry_run:
        for case in cases:
            print(f"plan {case.kind} batch={case.batch} tokens={case.context}")
        return 0
    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA device (use --dry-run to check the plan)")
    device, dtype = torch.device("cuda"), _DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()} | {args.dtype} | heads {args.num_heads}/"
          f"{args.num_kv_heads} | head_dim {args.head_dim} | block_size {args.block_size}")
    failures = check_correctness(args, device, dtype)
    copy_gbs = copy_bandwidth(device, args.iters, args.warmup)
    results = []
    for case in cases:
        results.append(run_case(case, args, device, dtype, copy_gbs))
        torch.cuda.empty_cache()
    print(format_results(results, copy_gbs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gb_per_s": copy_gbs, "failures": failures,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 1 if failures else 0

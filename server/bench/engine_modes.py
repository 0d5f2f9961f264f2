"""`pagedserve bench engine-modes`: the same server with its engine loop in a thread and in a
process, the same workload against each in alternation (A B A B ...), reported as ratios."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx

from server.bench.serve import make_prompts, run
from server.bench.server_process import free_port
from server.config import ENGINE_MODES

MODES = ENGINE_MODES


def _start(mode: str, model: str | None, port: int, extra: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "serve", *([model] if model else []), "--port",
           str(port), "--engine-mode", mode, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the {mode} server did not become ready")


def _served_name(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory (default: the bundled model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="extra `serve` flags, one string")
    parser.add_argument("--log", default="bench-engine-modes.log", help="servers' output")


def main(args) -> int:
    prompts = make_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed)
    extra = args.server_args.split() if args.server_args else []
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with open(args.log, "a") as log:
        for round_index in range(args.rounds):
            for mode in MODES:
                port = free_port()
                proc = _start(mode, args.model, port, extra, log)
                try:
                    summary = asyncio.run(run(
                        f"http://127.0.0.1:{port}/v1", _served_name(port), prompts,
                        args.output_len, args.concurrency, None, True, None, args.seed,
                        progress=False))
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                runs[mode].append(summary)
                print(f"round {round_index + 1} {mode:7s}: {summary['output_throughput']:7.1f} "
                      f"output tok/s, TTFT p50 {1e3 * summary['ttft_s']['p50']:7.1f} ms, "
                      f"TPOT p50 {1e3 * summary['tpot_s']['p50']:6.1f} ms, failed "
                      f"{summary['failed']}", flush=True)
    metrics = (("output tok/s", lambda s: s["output_throughput"]),
               ("TTFT p50 (ms)", lambda s: 1e3 * s["ttft_s"]["p50"]),
               ("TPOT p50 (ms)", lambda s: 1e3 * s["tpot_s"]["p50"]))
    print(f"\n{'metric':15s} {'thread':>16s} {'process':>16s} {'process/thread':>15s}")
    for name, get in metrics:
        a = [get(s) for s in runs["thread"]]
        b = [get(s) for s in runs["process"]]
        ratios = [y / x for x, y in zip(a, b)]
        print(f"{name:15s} {statistics.fmean(a):9.1f} ±{statistics.pstdev(a):5.1f} "
              f"{statistics.fmean(b):9.1f} ±{statistics.pstdev(b):5.1f} "
              f"{statistics.fmean(ratios):8.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0

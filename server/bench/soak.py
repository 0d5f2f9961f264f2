"""`pagedserve bench soak`: a long mixed workload against a server it starts (the bundled model by
default): completions and chat, streaming and not, n > 1, batched prompts with stop strings,
logprobs, clients that leave mid-stream and requests that must be refused. Every interval it
prints the answers by kind, the latency percentiles, the server's resident memory and KV use;
at the end it waits for the engine to settle and runs its consistency check (/debug/engine).

Exit status 1 on any unexpected answer (a 5xx, a wrong 4xx, a stream without [DONE], a
timeout), a leaked block or a broken invariant, or RSS growth past --max-rss-growth."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from server.bench.serve import percentiles
from server.bench.server_process import ServerProcess, free_port

# For a model without one (the bundled model): chat requests need a template.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily",
           "The sun was hot and", "Tom had a red ball. He"]
OK, REFUSED, LEFT, FAILED = "ok", "refused", "left", "failed"  # what one request came to


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "30m" or "2h"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 60s, 30m or 2h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class Outcome:
    kind: str
    result: str  # OK, REFUSED (an expected 4xx), LEFT (the client hung up), FAILED
    latency: float
    detail: str = ""


@dataclass
class Interval:
    elapsed_s: float
    counts: dict[str, int]
    latency_p50_s: float
    latency_p99_s: float
    rss_mib: float | None
    kv_cache_usage: float | None
    failures: list[str] = field(default_factory=list)


class Workload:
    """The request kinds, each an async call that returns an Outcome; picked at random."""

    def __init__(self, client: httpx.AsyncClient, model: str, rng: random.Random) -> None:
        self.client, self.model, self.rng = client, model, rng
        self.kinds: list[tuple[str, Callable[[], Awaitable[Outcome]], int]] = [
            ("completion", self.completion, 4), ("stream", self.stream, 4),
            ("chat", self.chat, 3), ("chat-stream", self.chat_stream, 3),
            ("batch-stop", self.batch_stop, 2), ("logprobs", self.logprobs, 2),
            ("disconnect", self.disconnect, 3), ("bad-input", self.bad_input, 2),
        ]

    def pick(self) -> Callable[[], Awaitable[Outcome]]:
        calls = [call for _, call, _ in self.kinds]
        return self.rng.choices(calls, weights=[w for _, _, w in self.kinds])[0]

    def _sampling(self) -> dict:
        return {"model": self.model, "max_tokens": self.rng.randint(4, 48),
                "temperature": self.rng.choice([0.0, 0.7, 1.0]),
                **({"seed": self.rng.randrange(1 << 31)} if self.rng.random() < 0.5 else {})}

    def _messages(self) -> list[dict]:
        return [{"role": "user", "content": self.rng.choice(PROMPTS)}]

    async def _post(self, kind: str, path: str, body: dict, check: Callable[[dict], str]
                    ) -> Outcome:
        start = time.monotonic()
        response = await self.client.post(path, json=body)
        latency = time.monotonic() - start
        if response.status_code != 200:
            return Outcome(kind, FAILED, latency, f"{response.status_code} {response.text[:200]}")
        problem = check(response.json())
        return Outcome(kind, FAILED if problem else OK, latency, problem)

    @staticmethod
    async def _not_ok(kind: str, response: httpx.Response, start: float) -> Outcome:
        """A stream that was refused: read its body for the failure's detail."""
        text = (await response.aread()).decode(errors="replace")
        return Outcome(kind, FAILED, time.monotonic() - start,
                       f"{response.status_code} {text[:200]}")

    async def _stream(self, kind: str, path: str, body: dict) -> Outcome:
        start = time.monotonic()
        async with self.client.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                return await self._not_ok(kind, response, start)
            events = [line async for line in response.aiter_lines() if line.startswith("data:")]
        latency = time.monotonic() - start
        if not events or events[-1] != "data: [DONE]":
            return Outcome(kind, FAILED, latency, "the stream ended without [DONE]")
        bad = next((e for e in events[:-1] if '"error"' in e), None)
        return Outcome(kind, FAILED if bad else OK, latency, bad or "")

    def _choices(self, expected: int) -> Callable[[dict], str]:
        def check(body: dict) -> str:
            got = len(body.get("choices", []))
            return "" if got == expected else f"{got} choices, expected {expected}"
        return check

    async def completion(self) -> Outcome:
        body = {**self._sampling(), "prompt": self.rng.choice(PROMPTS)}
        return await self._post("completion", "/v1/completions", body, self._choices(1))

    async def stream(self) -> Outcome:
        body = {**self._sampling(), "prompt": self.rng.choice(PROMPTS),
                "stream_options": {"include_usage": True}}
        return await self._stream("stream", "/v1/completions", body)

    async def chat(self) -> Outcome:
        n = self.rng.choice([1, 2, 3])
        body = {**self._sampling(), "messages": self._messages(), "n": n}
        return await self._post("chat", "/v1/chat/completions", body, self._choices(n))

    async def chat_stream(self) -> Outcome:
        body = {**self._sampling(), "messages": self._messages(), "stop": ["\n", "."]}
        return await self._stream("chat-stream", "/v1/chat/completions", body)

    async def batch_stop(self) -> Outcome:
        prompts = self.rng.sample(PROMPTS, self.rng.randint(2, 4))
        body = {**self._sampling(), "prompt": prompts, "stop": ["\n", "."]}
        if self.rng.random() < 0.5:
            return await self._stream("batch-stop", "/v1/completions", body)
        return await self._post("batch-stop", "/v1/completions", body,
                                self._choices(len(prompts)))

    async def logprobs(self) -> Outcome:
        body = {**self._sampling(), "prompt": self.rng.choice(PROMPTS), "logprobs": 3}
        return await self._post("logprobs", "/v1/completions", body, self._choices(1))

    async def disconnect(self) -> Outcome:
        """A client that reads a few events of a long stream, then hangs up."""
        body = {**self._sampling(), "max_tokens": 200, "ignore_eos": True, "stream": True,
                "prompt": self.rng.choice(PROMPTS), "n": self.rng.choice([1, 2])}
        keep = self.rng.randint(0, 6)
        start = time.monotonic()
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return await self._not_ok("disconnect", response, start)
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen > keep:
                    break
        return Outcome("disconnect", LEFT, time.monotonic() - start)

    async def bad_input(self) -> Outcome:
        """A request the server must refuse with a 400 in the error envelope."""
        cases: list[tuple[str, bytes]] = [
            ("/v1/completions", b'{"model": "m", "prompt": "x",'),
            ("/v1/completions", json.dumps({"prompt": [1, 10**9]}).encode()),
            ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode()),
            ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
            ("/v1/completions", json.dumps({"prompt": "x", "stop": list("abcde")}).encode()),
            ("/v1/completions", b'{"prompt": "\\ud800"}'),
            ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"-1": 1}}).encode()),
        ]
        path, raw = self.rng.choice(cases)
        start = time.monotonic()
        response = await self.client.post(path, content=raw,
                                          headers={"Content-Type": "application/json"})
        latency = time.monotonic() - start
        try:
            enveloped = set(response.json()["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            enveloped = False
        if response.status_code == 400 and enveloped:
            return Outcome("bad-input", REFUSED, latency)
        return Outcome("bad-input", FAILED, latency,
                       f"expected an enveloped 400, got {response.status_code} "
                       f"{response.text[:200]}")


async def _worker(workload: Workload, outcomes: list[Outcome], stop_at: float,
                  timeout: float) -> None:
    while time.monotonic() < stop_at:
        call = workload.pick()
        start = time.monotonic()
        try:
            outcome = await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError:
            outcome = Outcome(call.__name__, FAILED, time.monotonic() - start,
                              f"no answer within {timeout:.0f} s")
        except httpx.HTTPError as e:
            outcome = Outcome(call.__name__, FAILED, time.monotonic() - start,
                              f"{type(e).__name__}: {e}")
        outcomes.append(outcome)


def _kv_usage(samples: str) -> float | None:
    match = re.search(r"^pagedserve:kv_cache_usage_perc(?:\{[^}]*\})? (\S+)$", samples, re.M)
    return float(match.group(1)) if match else None


async def _settle(client: httpx.AsyncClient, timeout: float = 120.0) -> dict:
    """Wait until nothing runs or waits, then return the engine's check."""
    deadline = time.monotonic() + timeout
    while True:
        check = (await client.get("/debug/engine")).json()
        if not (check["num_running"] or check["num_waiting"]) or time.monotonic() > deadline:
            return check
        await asyncio.sleep(0.2)


async def soak(server: ServerProcess, model: str, duration: float, concurrency: int,
               interval: float, timeout: float, seed: int) -> tuple[list[Interval], dict]:
    # Idle connections expire before the server's keep-alive timeout (uvicorn's 5 s): otherwise a
    # request sent on one the server is closing at that moment fails, a client-side race.
    limits = httpx.Limits(max_connections=concurrency + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=server.base_url.removesuffix("/v1"), limits=limits,
                                 timeout=httpx.Timeout(timeout)) as client:
        outcomes: list[Outcome] = []
        start = time.monotonic()
        stop_at = start + duration
        rng = random.Random(seed)
        workers = [asyncio.create_task(_worker(Workload(client, model, random.Random(rng.random())),
                                               outcomes, stop_at, timeout))
                   for _ in range(concurrency)]
        intervals: list[Interval] = []
        seen, next_report, done = 0, start + interval, False
        while not done:
            await asyncio.wait(workers, timeout=max(0.0, next_report - time.monotonic()))
            done = all(w.done() for w in workers)
            if not done and time.monotonic() < next_report:
                continue
            next_report += interval
            batch, seen = outcomes[seen:], len(outcomes)
            counts = {r: sum(o.result == r for o in batch) for r in (OK, REFUSED, LEFT, FAILED)}
            latencies = percentiles([o.latency for o in batch if o.result == OK], (50, 99))
            metrics = (await client.get("/metrics")).text
            rss = server.rss_bytes()
            intervals.append(Interval(
                round(time.monotonic() - start, 1), counts, latencies["p50"], latencies["p99"],
                None if rss is None else rss / (1 << 20), _kv_usage(metrics),
                [f"{o.kind}: {o.detail}" for o in batch if o.result == FAILED][:5]))
            print(_row(intervals[-1]), flush=True)
        for worker in workers:
            worker.result()  # a bug in the soak itself surfaces here
        return intervals, await _settle(client)


def _row(i: Interval) -> str:
    c = i.counts
    rss = "   n/a" if i.rss_mib is None else f"{i.rss_mib:6.0f}"
    kv = "  n/a" if i.kv_cache_usage is None else f"{100 * i.kv_cache_usage:4.0f}%"
    line = (f"{i.elapsed_s:8.0f} {c[OK]:6d} {c[REFUSED]:7d} {c[LEFT]:6d} {c[FAILED]:6d} "
            f"{1e3 * i.latency_p50_s:8.0f} {1e3 * i.latency_p99_s:8.0f} {rss} {kv}")
    return line + "".join(f"\n    FAILED {f}" for f in i.failures)


HEADER = (f"{'time_s':>8s} {'ok':>6s} {'refused':>7s} {'left':>6s} {'failed':>6s} "
          f"{'p50_ms':>8s} {'p99_ms':>8s} {'rss_MiB':>6s} {'kv':>5s}")


def rss_growth(intervals: list[Interval], warmup: float) -> float | None:
    """Growth of the last RSS sample over the first one taken after `warmup` seconds."""
    samples = [(i.elapsed_s, i.rss_mib) for i in intervals if i.rss_mib is not None]
    after = [rss for t, rss in samples if t >= warmup]
    if len(after) < 2:
        return None
    return after[-1] / after[0] - 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory (default: the bundled model)")
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("60s"),
                        help="how long to load the server: 90, 90s, 30m, 2h (default 60s)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients at once")
    parser.add_argument("--interval", type=parse_duration, default=None,
                        help="report period (default: a tenth of the duration, 10 s to 60 s)")
    parser.add_argument("--warmup", type=parse_duration, default=None,
                        help="RSS growth is measured from the first report after this "
                             "(default: a fifth of the duration)")
    parser.add_argument("--max-rss-growth", type=float, default=None,
                        help="fail when RSS grows more than this fraction after warm-up "
                             "(e.g. 0.05)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take before it counts as a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="extra `serve` flags, one string")
    parser.add_argument("--log", default="bench-soak-server.log", help="the server's output")
    parser.add_argument("--output", default=None, help="write the reports here as JSON")


def main(args: argparse.Namespace) -> int:
    interval = args.interval or min(60.0, max(10.0, args.duration / 10))
    warmup = args.duration / 5 if args.warmup is None else args.warmup
    port = free_port()
    extra = shlex.split(args.server_args)
    if args.model is None and "--chat-template" not in extra:
        extra += ["--chat-template", CHAT_TEMPLATE]
    cmd = [sys.executable, "-m", "server", "serve", *([args.model] if args.model else []),
           "--port", str(port), "--debug-endpoints", "--log-level", "warning", *extra]
    server = ServerProcess("pagedserve", cmd, port, dict(os.environ),
                           Path(args.log))
    server.start()
    try:
        model = server.wait_ready(300)
        print(f"soak: {args.duration:.0f} s, {args.concurrency} clients, model {model}; the "
              f"server's log: {args.log}\n{HEADER}", flush=True)
        intervals, check = asyncio.run(soak(server, model, args.duration, args.concurrency,
                                            interval, args.timeout, args.seed))
    finally:
        server.stop()
    totals = {r: sum(i.counts[r] for i in intervals) for r in (OK, REFUSED, LEFT, FAILED)}
    leaked = check["num_blocks"] - check["num_free_blocks"]
    growth = rss_growth(intervals, warmup)
    unsettled = check["num_running"] + check["num_waiting"]
    print(f"\ntotal: {totals[OK]} ok, {totals[REFUSED]} refused as expected, {totals[LEFT]} "
          f"left mid-stream, {totals[FAILED]} failed; after the run: {unsettled} requests "
          f"unfinished, {leaked} KV blocks leaked of {check['num_blocks']}, invariants: "
          f"{check['problem'] or 'hold'}; RSS growth after {warmup:.0f} s warm-up: "
          f"{'n/a' if growth is None else f'{100 * growth:+.1f}%'}")
    if args.output:
        Path(args.output).write_text(json.dumps({
            "duration_s": args.duration, "concurrency": args.concurrency, "totals": totals,
            "engine_check": check, "rss_growth": growth, "warmup_s": warmup,
            "intervals": [asdict(i) for i in intervals]}, indent=1))
    ok = (totals[FAILED] == 0 and leaked == 0 and unsettled == 0 and check["problem"] is None
          and (args.max_rss_growth is None or growth is None or growth <= args.max_rss_growth))
    return 0 if ok else 1

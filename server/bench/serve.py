"""`pagedserve bench serve`: a streaming load generator for any OpenAI-compatible server.

Random prompts of exact token length (fixed seed) sent as token ids (`--prompt-format ids`) or as
text that the server's tokenizer turns into exactly `--input-len` tokens (`--prompt-format text`),
one warm-up request, then either a fixed concurrency or a Poisson request rate. Reports
completed/failed requests, request/s, output and total tok/s, and TTFT, TPOT, inter-token latency
and end-to-end latency percentiles. Output token counts come from the final usage chunk.

The warm-up prompt is the first prompt reversed, so it shares no prefix-cache block with the
measured prompts. A second run with the same seed against the same server sends the same prompts
again and can hit the server's prefix cache: vary --seed between runs, or restart the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in points} | {"mean": float("nan")}
    ordered = sorted(values)
    out = {}
    for p in points:
        # nearest-rank on a linear interpolation between closest ranks
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        out[f"p{p}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
    out["mean"] = statistics.fmean(ordered)
    return out


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (output_tokens + prompt_tokens) / duration
        if duration > 0 else 0.0,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "ttft_s": percentiles([r.ttft for r in done]),
        "tpot_s": percentiles([t for r in done if (t := r.tpot) is not None]),
        "itl_s": percentiles([x for r in done for x in r.itls]),
        "e2e_s": percentiles([r.e2e for r in done]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def make_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(3, vocab_size - 1)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num)]


def text_prompt_vocab(tokenizer) -> list[int]:
    """Token ids that decode on their own to non-empty, valid text (no special or lone-byte
    tokens): the pool random text prompts draw from."""
    special = set(tokenizer.all_special_ids)
    out = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text.strip().isprintable() and text.strip() and "\ufffd" not in text:
            out.append(token_id)
    if not out:
        raise ValueError("the tokenizer has no plain-text tokens to build prompts from")
    return out


def _text_of_length(tokenizer, target: int, vocab: list[int], rng: random.Random,
                    max_iters: int = 32) -> str | None:
    """Decode random ids, re-encode, cut or extend, until the text encodes to `target` tokens
    (without special tokens); None if it does not settle within max_iters."""
    ids = [rng.choice(vocab) for _ in range(target)]
    for _ in range(max_iters):
        text = tokenizer.decode(ids)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) == target:
            return text
        if len(ids) > target:
            ids = ids[:target]
        else:
            ids += [rng.choice(vocab) for _ in range(target - len(ids))]
    return None


def make_text_prompts(num: int, input_len: int, tokenizer, seed: int) -> list[str]:
    """`num` random texts that `tokenizer(text).input_ids` (special tokens included, as OpenAI
    servers tokenize a completion prompt) turns into exactly `input_len` tokens. Deterministic
    for a given tokenizer, length and seed."""
    num_special = tokenizer.num_special_tokens_to_add()
    target = input_len - num_special
    if target < 1:
        raise ValueError(f"--input-len must be > {num_special} (the tokenizer adds "
                         f"{num_special} special tokens), got {input_len}")
    vocab = text_prompt_vocab(tokenizer)
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < num:
        for _ in range(100):
            text = _text_of_length(tokenizer, target, vocab, rng)
            if text is not None and len(tokenizer(text).input_ids) == input_len:
                prompts.append(text)
                break
        else:
            raise ValueError(f"cannot make a text prompt of exactly {input_len} tokens")
    return prompts


def build_prompts(num: int, input_len: int, seed: int, prompt_format: str = "ids",
                  vocab_size: int = 500, tokenizer=None) -> list:
    """The workload's prompts: token-id lists (`ids`) or strings (`text`; `tokenizer` is a
    loaded tokenizer or a model/tokenizer directory)."""
    if prompt_format == "ids":
        return make_prompts(num, input_len, vocab_size, seed)
    if prompt_format != "text":
        raise ValueError(f"prompt format must be 'ids' or 'text', got {prompt_format!r}")
    if tokenizer is None:
        raise ValueError("--prompt-format text needs --tokenizer DIR")
    if isinstance(tokenizer, (str, Path)):
        from server.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(tokenizer))
    return make_text_prompts(num, input_len, tokenizer, seed)


def warmup_prompt_for(prompt):
    """The first prompt reversed: same length, no shared prefix-cache block with the workload."""
    return prompt[::-1]


async def send(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = last is not None
        if not result.ok:
            result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def request_body(model: str, prompt, output_len: int, ignore_eos: bool,
                 extra: dict | None = None) -> dict:
    """`extra`: more fields for every request (a structured-outputs constraint)."""
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": ignore_eos, **(extra or {})}


def json_schema_format(path: str | Path) -> dict:
    """The `response_format` that constrains every request to the JSON schema in `path`."""
    schema = json.loads(Path(path).read_text())
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "bench", "schema": schema}}}


async def run(base_url: str, model: str, prompts: list, output_len: int, concurrency: int | None,
              request_rate: float | None, ignore_eos: bool, api_key: str | None, seed: int,
              progress: bool = True, warmup_prompt=None, extra_body: dict | None = None
              ) -> dict:
    from tqdm import tqdm

    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        if warmup_prompt is None:
            warmup_prompt = warmup_prompt_for(prompts[0])
        # With a constraint, the warm-up also compiles its grammar before the clock starts.
        warm = await send(client, url, request_body(model, warmup_prompt, 4, ignore_eos,
                                                    extra_body), headers)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        bar = tqdm(total=len(prompts), desc="bench serve", disable=not progress)
        semaphore = asyncio.Semaphore(concurrency or len(prompts))
        rng = random.Random(seed)

        async def one(prompt) -> RequestResult:
            async with semaphore:
                result = await send(client, url, request_body(model, prompt, output_len,
                                                              ignore_eos, extra_body), headers)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    summary = summarize(results, duration)
    summary.update(model=model, num_prompts=len(prompts), output_len=output_len,
                   concurrency=concurrency, request_rate=request_rate)
    return summary


def format_table(summary: dict) -> str:
    rows = [
        ("completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("duration (s)", f"{summary['duration_s']:.2f}"),
        ("request/s", f"{summary['request_throughput']:.2f}"),
        ("output tok/s", f"{summary['output_throughput']:.1f}"),
        ("total tok/s", f"{summary['total_token_throughput']:.1f}"),
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                       ("e2e_s", "E2E")):
        p = summary[key]
        rows.append((f"{label} p50/p90/p99 (ms)",
                     f"{1e3 * p['p50']:.1f} / {1e3 * p['p90']:.1f} / {1e3 * p['p99']:.1f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench serve` flag (the CLI adds --log-level)."""
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name the server expects")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--prompt-format", default="ids", choices=["ids", "text"],
                        help="send prompts as token ids, or as text of exactly --input-len "
                             "tokens under --tokenizer (special tokens included)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer (model) directory for --prompt-format text")
    parser.add_argument("--vocab-size", type=int, default=500,
                        help="random prompt token ids are drawn below this (ids format)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="requests in flight")
    load.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals per second (default: all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json-schema", default=None, metavar="FILE",
                        help="constrain every request to this JSON schema (response_format)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary")


def main(args) -> int:
    prompts = build_prompts(args.num_prompts, args.input_len, args.seed,
                            getattr(args, "prompt_format", "ids"), args.vocab_size,
                            getattr(args, "tokenizer", None))
    schema = getattr(args, "json_schema", None)
    summary = asyncio.run(run(args.base_url, args.model, prompts, args.output_len,
                              args.concurrency, args.request_rate, args.ignore_eos,
                              args.api_key, args.seed,
                              extra_body=json_schema_format(schema) if schema else None))
    summary.update(input_len=args.input_len, prompt_format=getattr(args, "prompt_format", "ids"),
                   seed=args.seed, ignore_eos=args.ignore_eos, json_schema=schema)
    print(format_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


__all__ = ["RequestResult", "add_arguments", "asdict", "build_prompts", "format_table",
           "json_schema_format", "main", "make_prompts", "make_text_prompts", "percentiles",
           "run", "summarize"]

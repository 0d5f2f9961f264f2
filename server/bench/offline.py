"""`pagedserve bench offline`: throughput of the offline `LLM` API (the engine without HTTP) on
`bench serve`'s workload: the same random token-id prompts (same --seed and --vocab-size), all
submitted at once, greedy, max_tokens = --output-len. A warm-up generate runs first, on the first
prompt reversed (so it leaves nothing in the prefix cache for the measured prompts)."""

from __future__ import annotations

import argparse
import json
import time

from server.bench.serve import make_prompts, warmup_prompt_for
from server.config_flags import add_engine_flags, engine_flag_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench offline` flag (the CLI adds --log-level)."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (default: the bundled stories260k)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--vocab-size", type=int, default=500,
                        help="random prompt token ids are drawn below this")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary")
    add_engine_flags(parser.add_argument_group("engine"))


def summarize_offline(num_requests: int, num_prompt_tokens: int, num_output_tokens: int,
                      elapsed: float) -> dict:
    rate = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: 0.0)
    return {"num_requests": num_requests, "elapsed_s": elapsed,
            "total_prompt_tokens": num_prompt_tokens, "total_output_tokens": num_output_tokens,
            "request_throughput": rate(num_requests),
            "output_throughput": rate(num_output_tokens),
            "total_token_throughput": rate(num_prompt_tokens + num_output_tokens)}


def format_offline(summary: dict) -> str:
    rows = [("requests", str(summary["num_requests"])),
            ("prompt / output tokens",
             f"{summary['total_prompt_tokens']} / {summary['total_output_tokens']}"),
            ("elapsed (s)", f"{summary['elapsed_s']:.2f}"),
            ("request/s", f"{summary['request_throughput']:.2f}"),
            ("output tok/s", f"{summary['output_throughput']:.1f}"),
            ("total tok/s", f"{summary['total_token_throughput']:.1f}")]
    if "load_s" in summary:
        rows.insert(0, ("engine start-up (s)", f"{summary['load_s']:.2f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(args) -> int:
    from server import LLM, SamplingParams

    prompts = make_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed)
    start = time.perf_counter()
    llm = LLM(args.model, **engine_flag_kwargs(args))
    load_s = time.perf_counter() - start
    llm.generate([warmup_prompt_for(prompts[0])],
                 SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=args.ignore_eos))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0,
                            ignore_eos=args.ignore_eos)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    summary = summarize_offline(len(outputs), sum(len(p) for p in prompts),
                                sum(len(o.outputs[0].token_ids) for o in outputs), elapsed)
    summary.update(load_s=load_s, model=str(llm.engine.model_dir), input_len=args.input_len,
                   output_len=args.output_len, ignore_eos=args.ignore_eos, seed=args.seed,
                   engine=engine_flag_kwargs(args))
    print(format_offline(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0

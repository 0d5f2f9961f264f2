"""`pagedserve` command line (also `python -m server`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from server.config import LOG_FORMAT
from server.models.errors import ModelLoadError

# `pagedserve bench NAME`: module (with add_arguments(parser) and main(args)), help.
_BENCH_COMMANDS = {
    "serve": ("server.bench.serve", "streaming load against any OpenAI-compatible server"),
    "offline": ("server.bench.offline", "throughput of the offline LLM API (no HTTP)"),
    "compare": ("server.bench.compare", "pagedserve vs another server (vLLM-CPU), A B A B"),
    "engine-modes": ("server.bench.engine_modes", "the server's engine loop in a thread vs "
                     "in a process, A B A B"),
    "make-model": ("server.bench.make_model", "a reproducible random-weight model directory "
                   "with a locally trained tokenizer"),
    "roofline": ("server.bench.roofline", "this machine's matmul rate and memory bandwidth, "
                 "and the workload's ceilings"),
    "kernels": ("server.bench.kernels", "Triton kernel correctness and speed on CUDA"),
    "profile": ("server.bench.profile_step", "where a decode step's time goes: phases and "
                "top ops at a fixed batch"),
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per engine config field (server/config.py)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face model directory (default: the bundled stories260k)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampler for requests without their own seed")
    add_engine_flags(parser)


def add_engine_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The engine flags other than the model and the sampler seed, which the offline benchmarks
    take differently (--model; --seed seeds their prompts)."""
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="weight and activation dtype; auto takes config.json's")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "torch", "cpu", "triton"],
                        help="attention kernels: auto is Triton on CUDA and elsewhere cpu (the "
                             "torch path with a compiled fp32 decode kernel, built on first use "
                             "with the C++ compiler) or, without a compiler, torch")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length cap (default: the model's)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="bytes of KV cache (default: 1 GiB on CPU, 85%% of free memory "
                             "on CUDA)")
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                        action="store_false", help="turn prefix caching off")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="most requests running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one engine step (default: 512 on CPU, 2048 on "
                             "CUDA)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, seed=args.seed, **engine_flag_kwargs(args))


def engine_flag_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments `add_engine_flags` parsed."""
    return dict(dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
                max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_memory=args.kv_cache_memory,
                enable_prefix_caching=args.enable_prefix_caching,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens)


def _read_template(value: str | None) -> str | None:
    from pathlib import Path

    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


def _serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from server.api.app import build_app
    from server.config import EngineConfig, ServerConfig

    engine_config = EngineConfig.from_kwargs(**engine_kwargs(args))
    server_config = ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None,
        max_queued_requests=args.max_queued_requests,
        allowed_origins=tuple(args.allowed_origins or ()),
        max_request_body_bytes=args.max_request_body_bytes, log_level=args.log_level,
        shutdown_timeout=args.shutdown_timeout, chat_template=_read_template(args.chat_template),
        engine_mode=args.engine_mode)
    app = build_app(engine_config, server_config)
    # uvicorn re-raises a caught SIGTERM once its graceful shutdown is done, which kills the
    # process with the signal (exit -15/143); end with status 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=server_config.host, port=server_config.port,
                log_level=server_config.log_level,
                timeout_graceful_shutdown=int(server_config.shutdown_timeout) or None)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from server import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.sampling_seed)
    for out in llm.generate(args.prompt, params):
        completion = out.outputs[0]
        print(completion.text if args.continuation_only else llm.tokenizer.decode(
            out.prompt_token_ids + completion.token_ids, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           description="Serve a model over the OpenAI-compatible HTTP API.")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients use (default: the model directory's name)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 and /tokenize routes "
                            "(also from PAGEDSERVE_API_KEY)")
    serve.add_argument("--max-queued-requests", type=int, default=1024,
                       help="waiting requests beyond which new ones get 429")
    serve.add_argument("--allowed-origins", nargs="*", default=None, metavar="ORIGIN",
                       help="CORS origins allowed to call the API (default: none)")
    serve.add_argument("--max-request-body-bytes", type=int, default=16 << 20,
                       help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                       help="chat template (a file or the Jinja text) for models without one")
    serve.add_argument("--engine-mode", default="thread", choices=["thread", "process"],
                       help="run the engine loop in a thread of the server process or in a "
                            "process of its own")
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate offline from one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--continuation-only", action="store_true",
                     help="print only the generated text, not the prompt")
    gen.set_defaults(func=_generate)
    bench = sub.add_parser("bench", help="benchmarks (commands, not tests)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_commands = []
    for name, (module_name, help_text) in _BENCH_COMMANDS.items():
        command = bench_sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(func=module.main)
        bench_commands.append(command)
    for command in (serve, gen, *bench_commands):
        command.add_argument("--log-level", default="info",
                             choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    try:
        return args.func(args)
    except (ModelLoadError, ValueError) as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`pagedserve` command line (also `python -m server`)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys

from server.config import (
    ENGINE_MODES,
    LOG_FORMAT,
    LOG_LEVELS,
    TOOL_CALL_PARSERS,
    ServerConfig,
)
from server.config_flags import add_engine_args, default_of, engine_kwargs
from server.models.errors import ModelLoadError

# `pagedserve bench NAME`: module (with add_arguments(parser) and main(args)), help. A module is
# imported only when its command is chosen (`_BenchCommandParser`), so `serve` loads none.
_BENCH_COMMANDS = {
    "serve": ("server.bench.serve", "streaming load against any OpenAI-compatible server"),
    "offline": ("server.bench.offline", "throughput of the offline LLM API (no HTTP)"),
    "compare": ("server.bench.compare",
                "pagedserve vs vLLM-CPU and/or llama.cpp, alternating A B C C B A"),
    "engine-modes": ("server.bench.engine_modes", "the server's engine loop in a thread vs "
                     "in a process, A B A B"),
    "make-model": ("server.bench.make_model", "a reproducible random-weight model directory "
                   "(SmolLM2-shaped, or the tests' tiny Llama/Qwen/Mistral variants)"),
    "roofline": ("server.bench.roofline", "this machine's matmul rate and memory bandwidth, "
                 "and the workload's ceilings"),
    "soak": ("server.bench.soak", "a long mixed workload with disconnects and bad input: "
             "answers, latency, RSS and KV use over time, then the engine's check"),
    "perplexity": ("server.bench.perplexity", "perplexity on a text as llama-perplexity "
                   "computes it; with --reference, greedy agreement and top-5 |Δ logprob|"),
    "kernels": ("server.bench.kernels", "Triton kernel correctness and speed on CUDA"),
    "profile": ("server.bench.profile_step", "where an engine step's time goes: phases and "
                "top ops at a fixed decode batch, or over prompts' prefill (--prefill)"),
}


# ServerConfig's fields, each a `serve` flag of the same name.
SERVER_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(ServerConfig))


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One `serve` flag per ServerConfig field."""
    parser.add_argument("--host", default=default_of(ServerConfig, "host"),
                        help="address to bind")
    parser.add_argument("--port", type=int, default=default_of(ServerConfig, "port"))
    parser.add_argument("--served-model-name", default=default_of(ServerConfig,
                                                                  "served_model_name"),
                        help="model name clients use (default: the model directory's or file's "
                             "name)")
    parser.add_argument("--api-key", default=default_of(ServerConfig, "api_key"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(also from PAGEDSERVE_API_KEY)")
    parser.add_argument("--public-metrics", action=argparse.BooleanOptionalAction,
                        default=default_of(ServerConfig, "public_metrics"),
                        help="serve /metrics without the API key (for a Prometheus scraper)")
    parser.add_argument("--debug-endpoints", action=argparse.BooleanOptionalAction,
                        default=default_of(ServerConfig, "debug_endpoints"),
                        help="add GET /debug/engine: the engine's KV-pool and request-table "
                             "consistency check (for soaks and tests)")
    parser.add_argument("--max-queued-requests", type=int,
                        default=default_of(ServerConfig, "max_queued_requests"),
                        help="waiting requests beyond which new ones get 429")
    parser.add_argument("--allowed-origins", nargs="*", metavar="ORIGIN",
                        default=default_of(ServerConfig, "allowed_origins"),
                        help="CORS origins allowed to call the API (default: none)")
    parser.add_argument("--max-request-body-bytes", type=int,
                        default=default_of(ServerConfig, "max_request_body_bytes"),
                        help="larger request bodies get 413")
    parser.add_argument("--shutdown-timeout", type=float,
                        default=default_of(ServerConfig, "shutdown_timeout"),
                        help="seconds in-flight requests get to finish after SIGTERM")
    parser.add_argument("--chat-template", metavar="FILE_OR_JINJA",
                        default=default_of(ServerConfig, "chat_template"),
                        help="chat template: a file, the Jinja text, or a shipped one by name "
                             "(chatml-tools: ChatML with Hermes-format tools)")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                        default=default_of(ServerConfig, "tool_call_parser"),
                        help="how tool calls are read from the model's output (auto: the "
                             "format the chat template uses, when it names one)")
    parser.add_argument("--engine-mode", default=default_of(ServerConfig, "engine_mode"),
                        choices=ENGINE_MODES,
                        help="run the engine loop in a thread of the server process or in a "
                             "process of its own")
    _add_log_level(parser)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=default_of(ServerConfig, "log_level"),
                        choices=LOG_LEVELS)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig `add_server_flags` parsed (the API key also from the environment)."""
    import os

    values = {name: getattr(args, name) for name in SERVER_FLAG_FIELDS}
    values["api_key"] = values["api_key"] or os.environ.get("PAGEDSERVE_API_KEY") or None
    values["allowed_origins"] = tuple(values["allowed_origins"])
    values["chat_template"] = _read_template(values["chat_template"])
    return ServerConfig(**values)


def _read_template(value: str | None) -> str | None:
    from pathlib import Path

    if value is None:
        return None
    from server.assets import shipped_chat_template

    path = Path(value)
    if path.is_file():
        return path.read_text()
    return shipped_chat_template(value) or value


def _serve(args: argparse.Namespace) -> int:
    from server.api.app import build_app
    from server.config import EngineConfig

    engine_config = EngineConfig.from_kwargs(**engine_kwargs(args))
    config = server_config(args)
    return serve_app(build_app(engine_config, config), config)


def serve_app(app, config: ServerConfig) -> int:
    """Serve `app` (build_app's) until SIGTERM (status 0) or until its engine fails to start
    or dies (status 1, after one message naming the problem). A second SIGTERM or SIGINT
    during the graceful shutdown ends the process at once (status 128 + the signal)."""
    import os

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit:  # a second SIGTERM or SIGINT: no more waiting
                os._exit(128 + sig)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        timeout_graceful_shutdown=int(config.shutdown_timeout) or None))
    app.state.on_engine_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises a caught SIGTERM once its graceful shutdown is done, which kills the
    # process with the signal (exit -15/143); end with status 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    failure = app.state.engine_failure
    if failure is not None:
        print(f"pagedserve: {failure}", file=sys.stderr)
        return 1
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


class _BenchCommandParser(argparse.ArgumentParser):
    """A `bench NAME` parser that holds only its help until it is used: then it imports its
    module, which adds the command's flags and its `main`."""

    def __init__(self, *args, module_name: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._module_name = module_name

    def _load(self) -> None:
        if not self._module_name:
            return
        module = importlib.import_module(self._module_name)
        self._module_name = ""
        module.add_arguments(self)
        self.set_defaults(func=module.main)
        _add_log_level(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           description="Serve a model over the OpenAI-compatible HTTP API.")
    add_engine_args(serve)
    add_server_flags(serve)
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
    _add_log_level(gen)
    gen.set_defaults(func=_generate)
    bench = sub.add_parser("bench", help="benchmarks (commands, not tests)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True,
                                     parser_class=_BenchCommandParser)
    for name, (module_name, help_text) in _BENCH_COMMANDS.items():
        bench_sub.add_parser(name, help=help_text, description=help_text,
                             module_name=module_name)
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

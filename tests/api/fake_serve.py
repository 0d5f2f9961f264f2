"""`pagedserve serve` over the fake engine, for tests that must signal a server process:

    python -m tests.api.fake_serve --port PORT [other `serve` server flags]

The app runs through server/cli.py's `serve_app`, as `serve` runs it (the same SIGTERM path),
over a FakeEngineCore that runs one step, then holds every request until a line arrives on
stdin."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from server.api.app import build_app
from server.cli import add_server_flags, serve_app, server_config
from server.config import LOG_FORMAT, EngineConfig
from server.engine.fake import FakeEngineClient, FakeEngineCore


def _resume_on_stdin(core: FakeEngineCore) -> None:
    sys.stdin.readline()
    core.resume()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_serve", description=__doc__)
    add_server_flags(parser)
    config = server_config(parser.parse_args(argv))
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    core = FakeEngineCore()
    core.pause()
    core.allow(1)
    threading.Thread(target=_resume_on_stdin, args=(core,), name="resume", daemon=True).start()
    return serve_app(build_app(EngineConfig.from_kwargs(), config, engine=FakeEngineClient(core)),
                     config)


if __name__ == "__main__":
    sys.exit(main())

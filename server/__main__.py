"""`python -m server --model DIR [--engine transformers] [--host H] [--port P] ...` (`--help` lists all flags;
each is also an environment variable `SEVI_<FLAG>`)."""

from __future__ import annotations

import logging
import os
import sys
import threading

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.logs import setup_logging
from server.settings import parse_cli
from sevi.engines import AUTO, ENGINES
from sevi.method.knob import PresetsError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_cli(argv)
    except ValidationError as exc:  # a bad flag or SEVI_* variable: say which, without a traceback
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not (settings.model / "config.json").exists():
        print(
            f"error: {settings.model} is not a model folder (no config.json). Pass --model DIR, or build a test "
            "model: python -m sevi.testing.tiny --family llava --out build/tiny-llava",
            file=sys.stderr,
        )
        return 2
    if settings.engine != AUTO and settings.engine not in ENGINES:
        choices = ", ".join([AUTO, *sorted(ENGINES)])
        print(f"error: unknown engine {settings.engine!r}; available: {choices}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    exit_code = 0
    server: uvicorn.Server | None = None

    def exit_process(code: int) -> None:
        """The engine died (server/watchdog.py): shut down as on SIGTERM, then return `code` from main. Requests
        in flight have already ended with their error; if the shutdown itself hangs (a worker step that never
        returns), the process is ended anyway, since a supervisor can only restart a process that exits."""
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True
        hard = threading.Timer(GRACEFUL_SHUTDOWN_S + HARD_EXIT_MARGIN_S, _hard_exit, args=(code,))
        hard.daemon = True
        hard.start()

    try:
        app = create_app(settings, exit_process=exit_process)
    except PresetsError as exc:  # the model's sevi_presets.json: name the file and the field, serve nothing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Our middleware logs every request as JSON; uvicorn's access log would say it twice.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    server.run()
    return exit_code


# SIGTERM: requests in flight get this long to finish; new connections are refused at once.
GRACEFUL_SHUTDOWN_S = 10
# After an exit for a dead engine: how long the orderly shutdown may take past that before the process is ended.
HARD_EXIT_MARGIN_S = 20


def _hard_exit(code: int) -> None:
    logging.getLogger("sevi.server").error("shutdown did not finish: exiting now", extra={"fields": {"code": code}})
    for handler in logging.getLogger("sevi").handlers:
        handler.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

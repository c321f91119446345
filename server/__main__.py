"""`python -m server --model DIR [--engine transformers] [--host H] [--port P] ...` (`--help` lists all flags;
each is also an environment variable `SEVI_<FLAG>`)."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from models.presets import PresetsError
from server.app import create_app
from server.engines import AUTO, ENGINES
from server.logs import setup_logging
from server.settings import parse_cli


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_cli(argv)
    except ValidationError as exc:  # a bad flag or SEVI_* variable: say which, without a traceback
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not (settings.model / "config.json").exists():
        print(
            f"error: {settings.model} is not a model folder (no config.json). Pass --model DIR, or build a test "
            "model: python -m models.tiny --family llava --out build/tiny-llava",
            file=sys.stderr,
        )
        return 2
    if settings.engine != AUTO and settings.engine not in ENGINES:
        choices = ", ".join([AUTO, *sorted(ENGINES)])
        print(f"error: unknown engine {settings.engine!r}; available: {choices}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        app = create_app(settings)
    except PresetsError as exc:  # the model's sevi_presets.json: name the file and the field, serve nothing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Our middleware logs every request as JSON; uvicorn's access log would say it twice.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, timeout_graceful_shutdown=10
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

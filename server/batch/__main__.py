"""`python -m server.batch --model DIR --input PATH --output FILE.jsonl [--levels 0,0.5,1] [--ray --workers N] ...`

(`--help` lists every flag: the job's, then the server's engine settings, each also a `SEVI_*` variable.)
Exit status: 0 when the job ran to its end (failed items are records in the output, not a failed job), 2 for bad
flags or input, 1 when the model did not load or the engine stopped serving mid-job (rerun to resume).
"""

from __future__ import annotations

import asyncio
import json
import sys

from pydantic import ValidationError

from server.batch import inputs
from server.batch.config import parse_cli
from server.batch.job import LoadError, run_local
from server.batch.runner import EngineUnavailable
from server.batch.summary import render
from server.logs import setup_logging
from sevi.engines import AUTO, ENGINES
from sevi.method.knob import AlignmentParamError, PresetsError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_cli(argv)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not (settings.model / "config.json").exists():
        print(f"error: {settings.model} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    if settings.engine != AUTO and settings.engine not in ENGINES:
        print(f"error: unknown engine {settings.engine!r}; available: {', '.join([AUTO, *ENGINES])}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        inputs.detect(settings.input)
        if settings.ray:
            from server.batch.ray_job import run_ray

            summary = run_ray(settings)
        else:
            summary = asyncio.run(run_local(settings))
    except (inputs.InputError, AlignmentParamError, PresetsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except EngineUnavailable as exc:
        print(f"error: the engine stopped serving ({exc}); rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(render(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The batch command's settings: the server's whole settings tree (engine, limits, kernels, `--vllm.*`) plus the
job's own flags, parsed the same way (`--flag` over `SEVI_*` over the default).

Defaults that differ from the server's, and why: `--max-queue` and `--request-timeout-s` are larger, since a batch
job fills the engine on purpose (the HTTP server's bounds protect interactive clients, which a batch job has none
of), and a request that waits behind a full batch is not late.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import CliApp, CliImplicitFlag, SettingsConfigDict

from server.settings import Settings

# A level as asked: a number in [0, 1] or a preset name; checked per request by the same code as the API's knob.
Level = float | str


class BatchSettings(Settings):
    model_config = SettingsConfigDict(
        env_prefix="SEVI_",
        cli_kebab_case=True,
        cli_prog_name="python -m server.batch",
        cli_implicit_flags=False,
        extra="ignore",
    )

    input: Path = Field(
        description='A folder of images (recursive), a JSONL manifest ({"id", "image", ...} per line) or an OpenAI '
        'batch file ({"custom_id", "method", "url", "body"} per line); told apart by content.'
    )
    output: Path = Field(description="JSONL results, appended as they complete; rerun the same command to resume.")
    levels: str | None = Field(
        None,
        description="Comma-separated conservativeness levels (numbers in [0, 1] or presets), each item captioned at "
        "each: e.g. 0,0.5,1. Items (or batch requests) that name their own conservativeness run at it alone. "
        "Default: the server's default_conservativeness (OpenAI batch files: each request's own).",
    )
    prompt: str | None = Field(None, description="Instruction for items that give none (default: the API's).")
    max_tokens: int | None = Field(None, ge=1, description="max_tokens of items that give none (default: the API's).")
    ray: CliImplicitFlag[bool] = Field(False, description="Scale out on Ray Data: --workers actors, one engine each.")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: start a local one).")
    workers: int = Field(1, ge=1, description="Ray actors (engines); with --ray only.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU cores each Ray actor reserves (and its torch threads).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each Ray actor reserves (1 on GPU machines).")
    ray_batch_size: int = Field(32, ge=1, description="Items per Ray Data batch handed to an actor.")
    preprocess_workers: int = Field(2, ge=1, description="Threads reading and decoding images ahead of the engine.")
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Engine rows decoded or in the engine at once, a request with contrast counting two (default: "
        "twice the engine's rows, so a full batch of decoded images always waits behind the running one).",
    )
    progress: Literal["auto", "bar", "log", "off"] = Field(
        "auto", description="auto: a tqdm bar on a terminal, else a log line every --log-every-s."
    )
    log_every_s: float = Field(10.0, gt=0, description="Seconds between progress log lines (no terminal).")
    max_queue: int = Field(4096, ge=1, description="Engine queue bound (the batch command fills the engine itself).")
    request_timeout_s: float = Field(3600.0, gt=0, description="Per-request deadline from submission to the engine.")

    @field_validator("levels", mode="before")
    @classmethod
    def _levels_text(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value)
        return value

    def level_list(self) -> list[Level] | None:
        """`--levels` parsed (None when not given): numbers stay numbers, names stay names."""
        if self.levels is None or not self.levels.strip():
            return None
        return [parse_level(part) for part in self.levels.split(",") if part.strip()]


def parse_level(text: str) -> Level:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return text.lower()


def parse_cli(argv: list[str] | None = None) -> BatchSettings:
    return CliApp.run(BatchSettings, cli_args=argv)

"""Every knob of the service in one pydantic-settings object: `--max-batch-size 8` or `SEVI_MAX_BATCH_SIZE=8`.

Precedence: command line, then environment (prefix `SEVI_`), then the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
# Requests decoding at once where max_batch_size is unset: the reference engine everywhere, the vLLM engine on
# CPU (a few cores: a larger batch makes every step slower). On a GPU the vLLM engine follows vLLM's own
# defaults instead (server/engines/vllm_engine.py: vllm_batch_args).
DEFAULT_MAX_BATCH_SIZE = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEVI_", cli_kebab_case=True, cli_prog_name="python -m server", cli_implicit_flags=False,
        extra="ignore",
    )

    model: Path = Field(Path("models/bundled"), description="Hugging Face model folder to serve.")
    served_model_name: str | None = Field(None, description="Model id in the API (default: the folder name).")
    engine: str = Field("auto", description="Inference engine: vllm, transformers (the reference engine), or auto "
                                            "(vllm where installed, else transformers).")
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1/* and /caption need `Authorization: Bearer KEY`.")
    default_conservativeness: float = Field(
        0.5, ge=0.0, le=1.0, description="Conservativeness of requests that name none (0 = unmodified model).")
    contrast_pool: Path | None = Field(None, description="Folder of contrast images (default: built-in noise images).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("cpu", description="Torch device of the reference engine.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads of the engine "
                                       "(default on CPU: every core but one, left to the HTTP loop).")

    max_batch_size: int | None = Field(
        None, ge=1, description="Most requests decoding at once (default: 8; the vLLM engine on a GPU: vLLM's "
                                "own max_num_seqs for the device, half of it in requests).")
    max_cohorts: int = Field(
        2, ge=1, description="Most batches interleaved step by step, so new arrivals need not wait for a batch to end.")
    max_queue: int = Field(64, ge=1, description="Most requests waiting for a batch slot; beyond it 503 + Retry-After.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request deadline, queueing included.")

    max_request_bytes: int = Field(20 * MiB, ge=1024, description="Largest request body (413 above).")
    max_image_bytes: int = Field(10 * MiB, ge=1, description="Largest encoded image (413 above).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest width*height before decoding (decompression-bomb guard, 413 above).")
    max_images_per_request: int = Field(4, ge=1, description="Most images in one request (400 above).")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of requests that name none.")
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts (host or host:port) that image_url may fetch over http(s); empty = data URIs only.")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Timeout for fetching an allow-listed image URL.")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        # The environment gives one string: accept "a.com,b.com" besides a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [h.strip() for h in text.split(",") if h.strip()]
        return value

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.resolve().name


def parse_cli(argv: list[str] | None = None) -> Settings:
    """Settings from the command line over the environment (`--help` lists every flag)."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)

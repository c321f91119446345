"""Every knob of the service in one pydantic-settings tree: `--max-batch-size 8` or `SEVI_MAX_BATCH_SIZE=8`.

Precedence: command line, then environment, then the defaults below. The root holds the server's settings;
two nested groups hold the rest, each flag `--GROUP.FIELD`, with the environment names they had before the
tree (users, scripts and the compose file set them):

- `settings.vllm` (:class:`VllmSettings`): `--vllm.tensor-parallel-size 2` or `SEVI_VLLM_TENSOR_PARALLEL_SIZE=2`;
- `settings.kernels` (:class:`KernelSettings`): `--kernels.aligned-kernel torch` or `SEVI_ALIGNED_KERNEL=torch`.

The tree is passed down: `create_engine(settings)` hands the groups to the engine, which exports the switches
vLLM's own processes need into the environment (sevi/runtime/runtime_env.py, the one module below this one that
reads it) before vLLM starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliApp,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from sevi.engines.vllm.options import VllmSettings
from sevi.runtime import runtime_env

MiB = 1024 * 1024


class KernelSettings(BaseSettings):
    """The kernels SEVI runs on CPU and GPU; each also `SEVI_<FIELD>`, e.g. SEVI_ALIGNED_KERNEL=torch."""

    # env_prefix SEVI_ gives these fields their names from before the tree (SEVI_ALIGNED_KERNEL, ...), the same
    # names vLLM's processes read them by (sevi/runtime/runtime_env.py).
    model_config = SettingsConfigDict(env_prefix="SEVI_", extra="ignore")

    aligned_kernel: Literal["c", "triton", "torch"] | None = Field(
        None,
        description="Kernel of the aligned rows in the vLLM backends (default: c on CPU where the system "
        "compiler builds it, triton on a GPU where it imports, else torch).",
    )
    paged_kernel: bool = Field(
        True, description="vLLM on CPU reads the aligned rows' K/V with the C kernel (false: the torch gather path)."
    )
    compiled_operator: bool = Field(
        True,
        description="On CPU both engines run the alignment operator compiled ahead "
        "of time (AOTInductor; false: eager PyTorch).",
    )
    kernel_cache: Path = Field(
        runtime_env.default_kernel_cache(),
        description="Folder of the code built at run time (C kernel, compiled operator).",
    )

    @field_validator("aligned_kernel", mode="before")
    @classmethod
    def _kernel_name(cls, value: Any) -> Any:
        # As the plugin reads it in vLLM's processes: case and spaces do not matter, empty = the default.
        if isinstance(value, str):
            return value.strip().lower() or None
        return value


class _GroupEnvSource(PydanticBaseSettingsSource):
    """The nested groups' environment variables, each group by its own prefix (SEVI_VLLM_*, SEVI_*): pydantic's
    nested delimiter would need one prefix per group (SEVI_KERNELS_ALIGNED_KERNEL) and break the old names."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads whole groups

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            group = info.annotation
            if isinstance(group, type) and issubclass(group, BaseSettings):
                values = EnvSettingsSource(group)()
                if values:
                    found[name] = values
        return found


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEVI_",
        cli_kebab_case=True,
        cli_prog_name="python -m server",
        cli_implicit_flags=False,
        extra="ignore",
    )

    model: Path = Field(Path("models/bundled"), description="Hugging Face model folder to serve.")
    served_model_name: str | None = Field(None, description="Model id in the API (default: the folder name).")
    engine: str = Field(
        "auto",
        description="Inference engine: vllm, transformers (the reference engine), or auto "
        "(vllm where installed, else transformers).",
    )
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1/* and /caption need `Authorization: Bearer KEY`."
    )
    default_conservativeness: float = Field(
        0.5, ge=0.0, le=1.0, description="Conservativeness of requests that name none (0 = unmodified model)."
    )
    contrast_pool: Path | None = Field(None, description="Folder of contrast images (default: built-in noise images).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype. auto: as vLLM picks it (bfloat16 on CPUs with native bfloat16, AVX512_BF16 or "
        "AMX; float32 on other CPUs; the checkpoint's 16-bit dtype on GPUs).",
    )
    device: str = Field("cpu", description="Torch device of the reference engine.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the engine (default on CPU: every core but one, left to the HTTP loop).",
    )

    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="Most requests decoding at once (default: 8; the vLLM engine on a GPU: vLLM's "
        "own max_num_seqs for the device, half of it in requests).",
    )
    max_cohorts: int = Field(
        2, ge=1, description="Most batches interleaved step by step, so new arrivals need not wait for a batch to end."
    )
    max_queue: int = Field(64, ge=1, description="Most requests waiting for a batch slot; beyond it 503 + Retry-After.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request deadline, queueing included.")
    engine_dead_exit_after_s: float = Field(
        5.0,
        ge=0,
        description="Once the engine is dead (a worker process or thread gone), /health and /ready answer 503 and "
        "the process exits with status 3 after this many seconds, for a supervisor to restart it.",
    )

    max_request_bytes: int = Field(20 * MiB, ge=1024, description="Largest request body (413 above).")
    max_image_bytes: int = Field(10 * MiB, ge=1, description="Largest encoded image (413 above).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest width*height before decoding (decompression-bomb guard, 413 above)."
    )
    max_images_per_request: int = Field(4, ge=1, description="Most images in one request (400 above).")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of requests that name none.")
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts (host or host:port) that image_url may fetch over http(s); empty = data URIs only.",
    )
    allow_internal_image_hosts: bool = Field(
        False,
        description="Let allowed_image_hosts reach loopback, private, link-local and other internal addresses "
        "(refused by default, even for a listed host).",
    )
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Timeout for fetching an allow-listed image URL.")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # Defaults without a second look at the environment: _GroupEnvSource has read it for the root.
    vllm: VllmSettings = Field(default_factory=lambda: VllmSettings.model_construct(), description=VllmSettings.__doc__)
    kernels: KernelSettings = Field(
        default_factory=lambda: KernelSettings.model_construct(), description=KernelSettings.__doc__
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The command line comes first through CliApp; the groups' variables rank with the root's.
        return init_settings, env_settings, _GroupEnvSource(settings_cls), dotenv_settings, file_secret_settings

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

    def runtime_options(self) -> runtime_env.RuntimeOptions:
        """The switches every process running SEVI's code reads, for the engine to export before vLLM starts."""
        k = self.kernels
        return runtime_env.RuntimeOptions(
            aligned_kernel=k.aligned_kernel,
            paged_kernel=k.paged_kernel,
            compiled_operator=k.compiled_operator,
            kernel_cache=k.kernel_cache,
            plugin_disabled=self.vllm.disable,
        )


def parse_cli(argv: list[str] | None = None) -> Settings:
    """Settings from the command line over the environment (`--help` lists every flag)."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)

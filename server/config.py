"""Server configuration, parsed once at start-up.

Every setting is a field of :class:`ServerSettings`; it can be given as a ``deft serve`` flag
(``--max-queue 64``), as an environment variable with the ``DEFT_`` prefix (``DEFT_MAX_QUEUE=64``),
or left at its default. Flags override the environment. The frozen settings object is passed down
explicitly; nothing reads the environment after this.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deft_server.store import REGISTRY_URL_HELP, is_registry_url
from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deft_runtime.engine import EngineConfig
from deft_runtime.formats import ReadLimits


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/deft`` (``~/.local/share/deft``) on Linux,
    ``~/Library/Application Support/deft`` on macOS, ``%LOCALAPPDATA%\\deft`` on Windows."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "deft"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "deft"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "deft"


@dataclass(frozen=True)
class RequestLimits:
    """What one generation request may ask for (checked before it reaches the engine)."""

    max_pixels: int
    max_steps: int
    max_images: int
    max_prompt_chars: int
    max_adapters: int
    max_adapter_weight: float
    max_guidance_scale: float = 100.0
    max_input_images: int = 4
    max_input_image_pixels: int = 2048 * 2048


@dataclass(frozen=True)
class UploadLimits:
    """What one ``RegisterAdapter`` stream may carry (checked while it streams)."""

    max_bytes: int
    max_chunks: int
    max_metadata_bytes: int
    max_metadata_entries: int = 64
    max_metadata_key_chars: int = 128
    #: past the first ``free_chunks``, data chunks must carry this many bytes on average
    free_chunks: int = 64
    min_average_chunk_bytes: int = 4096


class ServerSettings(BaseSettings):
    """All of ``deft serve``'s settings (flag ``--foo-bar`` = field ``foo_bar`` = env ``DEFT_FOO_BAR``).

    Each field is the one declaration of its setting: :mod:`deft_server.cli` generates the flag from
    the field's name, type, default and ``description`` (its help line), so a new field needs a
    ``description`` and nothing else."""

    model_config = SettingsConfigDict(env_prefix="DEFT_", frozen=True, extra="forbid")

    # --- what to serve, where
    model: str = Field(
        "shapes-sdxl", description="shapes-sdxl | tiny-sdxl | tiny-omnigen | diffusers directory | hub id"
    )
    host: str = Field("127.0.0.1", description="address the gRPC, HTTP and metrics servers listen on")
    port: int = Field(50051, ge=1, le=65535, description="gRPC port")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port (0: off)")
    metrics_tenant_labels: bool = Field(
        False,
        description="label request counts and latencies by tenant id: one time series per tenant, so "
        "only with a bounded number of tenants (cardinality); adapter names are never labels",
    )
    http_port: int = Field(
        8000, ge=0, le=65535, description="OpenAI-compatible HTTP API and playground port (0: off)"
    )
    cors_origin: list[str] = Field(
        default_factory=list,
        description="browser origin allowed to call the HTTP API (repeatable; default none)",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir, description="registry folder (SQLite index, blobs, compiled cache)"
    )
    registry: str | None = Field(
        None,
        description="shared registry URL (postgresql://user:pass@host/db); default: SQLite under data_dir",
    )
    cache_dir: Path | None = Field(None, description="tiny-model cache (default ~/.cache/deft/models)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16"
    )
    backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="adapter kernels: auto | torch | triton"
    )
    # --- security
    auth: Literal["none", "token", "keys"] | None = Field(
        None,
        description="none | token (one shared --token) | keys (tenant keys: deft keys create); "
        "default: token when --token is given, else none",
    )
    insecure_no_auth: bool = Field(False, description="allow --auth none on a non-loopback --host")
    token: SecretStr | None = Field(None, description="require 'authorization: Bearer TOKEN' on every call")
    tls_cert: Path | None = Field(None, description="PEM certificate chain (TLS on when given)")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="mutual TLS: require client certificates signed by this PEM CA bundle"
    )
    tls_client_tenants: Path | None = Field(
        None,
        description="with --auth keys and --tls-client-ca: JSON file mapping certificate subjects to "
        "key ids, so a certificate stands in for that key",
    )
    # --- adapter memory
    adapter_memory: ByteSize = Field(ByteSize(512 << 20), description="device pool for adapter factors")
    adapter_host_memory: ByteSize = Field(ByteSize(2 << 30), description="host cache of adapter factors")
    max_rank: int = Field(64, ge=1, le=1024, description="largest adapter rank accepted")
    max_resident_adapters: int = Field(64, ge=1, description="adapters on the device at once")
    # --- scheduling
    max_batch_rows: int = Field(16, ge=1, description="rows per denoiser forward (CFG rows count)")
    max_active: int = Field(32, ge=1, description="requests denoising at once")
    max_queue: int = Field(256, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    mixed_batch_rows: int | None = Field(
        None,
        ge=1,
        description="rows per forward while several tenants have work (default: --max-batch-rows, "
        "right where extra rows are nearly free; 4 on a 2-core CPU met both fairness targets)",
    )
    idle_credit_row_steps: float = Field(
        100.0,
        ge=0,
        allow_inf_nan=False,
        description="row-steps a tenant back from idle may run ahead of the others in batch planning",
    )
    newcomer_slots: int = Field(
        1,
        ge=0,
        description="in-flight slots beyond --max-active for a tenant below its weighted share of "
        "--max-active (one with nothing in flight always is), so another tenant's flood cannot hold "
        "its requests, or a short burst of them, in the queue",
    )
    compile_buckets: bool = Field(
        False,
        description="with --compile: pad every forward to a power-of-two batch size (up to "
        "--max-batch-rows) and compile each size once with static shapes; on a GPU this adds CUDA graphs "
        "(inductor's reduce-overhead mode). SDXL-family models only",
    )
    batch_order: Literal["longest-wait", "arrival", "fewest-remaining"] = Field(
        "longest-wait",
        description="who fills a forward after the longest-waiting request: longest-wait (every active "
        "request at the same pace) | arrival (earliest first) | fewest-remaining (fewest steps left first)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the denoiser with its adapter layers (inductor); compiles at start-up, "
        "before the server reports SERVING (40-75 s for tiny-sdxl or shapes-sdxl on 2 CPU cores, cold), and never "
        "again when adapters or their mix change",
    )
    grace_period: float = Field(30.0, ge=0, description="seconds in-flight requests get after SIGTERM")
    # --- request limits
    max_pixels: int = Field(2048 * 2048, ge=1, description="largest width x height")
    max_steps: int = Field(150, ge=1, description="most denoising steps")
    max_images: int = Field(8, ge=1, description="largest num_images")
    max_prompt_chars: int = Field(4000, ge=1, description="longest prompt and negative prompt")
    max_adapters_per_request: int = Field(4, ge=1, le=64, description="most adapters per request")
    max_adapter_weight: float = Field(10.0, gt=0, description="adapter weights must lie in [-W, W]")
    max_upload_size: ByteSize = Field(ByteSize(1 << 30), description="largest adapter upload")
    max_message_size: ByteSize = Field(ByteSize(16 << 20), description="largest gRPC message received")
    max_guidance_scale: float = Field(100.0, gt=0, description="guidance_scale must lie in [0, G]")
    max_input_images: int = Field(
        4, ge=1, le=64, description="most input images per image-conditioned request (OmniGen, SDXL img2img)"
    )
    max_input_image_pixels: int = Field(
        2048 * 2048,
        ge=1,
        description="largest width x height of an input image or mask (read from its header)",
    )
    max_upload_chunks: int = Field(
        16384, ge=1, description="most data chunks in one upload (empty ones count)"
    )
    max_metadata_size: ByteSize = Field(
        ByteSize(8 << 10), description="largest adapter metadata (UTF-8 bytes of its keys and values)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG | INFO | WARNING | ERROR"
    )
    log_prompts: bool = Field(
        False,
        description="quote prompts in the access log (one INFO line per request on deft_server.access); "
        "off by default: prompts are the users' data",
    )

    @field_validator("max_adapter_weight", "max_guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("registry")
    @classmethod
    def _registry_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not is_registry_url(value):
            raise ValueError(REGISTRY_URL_HELP)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        if self.tls_client_tenants is not None and (self.tls_client_ca is None or self.auth_mode != "keys"):
            raise ValueError("--tls-client-tenants goes with --auth keys and --tls-client-ca")
        if self.max_message_size < 1 << 20:
            raise ValueError("max_message_size must be at least 1MiB (uploads travel in 256KiB chunks)")
        return self

    @model_validator(mode="after")
    def _auth_pair(self) -> ServerSettings:
        if self.auth == "token" and self.token is None:
            raise ValueError("--auth token needs --token TOKEN (or DEFT_TOKEN)")
        if self.auth in ("keys", "none") and self.token is not None:
            raise ValueError(f"--token goes with --auth token, not --auth {self.auth}")
        return self

    # --- derived, typed views handed to the components

    @property
    def auth_mode(self) -> Literal["none", "token", "keys"]:
        """``--auth``, or its default: token when a --token is given, else none."""
        return self.auth or ("token" if self.token is not None else "none")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_rows=self.max_batch_rows,
            max_active=self.max_active,
            max_queue=self.max_queue,
            mixed_batch_rows=self.mixed_batch_rows,
            idle_credit_row_steps=self.idle_credit_row_steps,
            newcomer_slots=self.newcomer_slots,
            compile=self.compile,
            compile_buckets=self.compile_buckets,
            batch_order=self.batch_order,
        )

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_pixels=self.max_pixels,
            max_steps=self.max_steps,
            max_images=self.max_images,
            max_prompt_chars=self.max_prompt_chars,
            max_adapters=self.max_adapters_per_request,
            max_adapter_weight=self.max_adapter_weight,
            max_guidance_scale=self.max_guidance_scale,
            max_input_images=self.max_input_images,
            max_input_image_pixels=self.max_input_image_pixels,
        )

    def upload_limits(self) -> UploadLimits:
        return UploadLimits(
            max_bytes=int(self.max_upload_size),
            max_chunks=self.max_upload_chunks,
            max_metadata_bytes=int(self.max_metadata_size),
        )

    def read_limits(self) -> ReadLimits:
        return ReadLimits(max_file_bytes=int(self.max_upload_size))

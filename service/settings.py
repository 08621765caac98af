"""Service settings: environment variables with the ``VLD_`` prefix, validated at start-up.

Every error names the environment variable to fix (``VLD_MAX_K``…), because that is what an
operator sets. ``model_dir`` and ``index_root`` are optional here so that an app can be built
without them; :func:`require_serving_paths` enforces them when the service starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "VLD_"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingsError(ValueError):
    """A setting that is missing or invalid; the message names its environment variable."""


class Settings(BaseSettings):
    """Everything the service reads from its environment (``VLD_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Paths. Required to serve; see require_serving_paths.
    model_dir: Path | None = Field(None, description="Decomposed VLDeformer checkpoint directory.")
    index_root: Path | None = Field(None, description="Index root the indexer publishes into.")
    teacher_dir: Path | None = Field(
        None,
        description="Early-interaction teacher checkpoint (ViLT with its retrieval head) that "
        "re-ranks shortlists; unset = no re-ranking.",
    )
    rerank_default: bool = Field(
        False, description="Re-rank a query that does not say (needs VLD_TEACHER_DIR)."
    )
    rerank_cache_size: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Gallery images whose preprocessed pixels the re-ranker keeps (LRU).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    runtime: Literal["torch", "onnx", "onnx-int8", "auto"] = Field(
        "torch",
        description="Encoder runtime of the query encoder: torch; onnx / onnx-int8 = ONNX "
        "Runtime fp32 / int8 on the CPU (exported next to the checkpoint and checked against "
        "torch on first use); auto = torch on a GPU, else the fastest runtime that passes "
        "its check, falling back to torch. An index built with a runtime not checked "
        "compatible with this one is refused.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Intra-op threads per forward pass (torch or ONNX Runtime); unset = the "
        "runtime's default (one per core). 1 is faster on a CPU shared with other busy "
        "processes.",
    )

    # Network.
    host: str = Field("127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="0 lets the OS pick a free port.")

    # Input limits.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest request body.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (w*h).")
    max_k: int = Field(100, ge=1, le=10_000, description="Largest k a query may ask for.")
    max_text_chars: int = Field(1000, ge=1, le=100_000, description="Longest text query.")

    # Micro-batching and back-pressure (per modality).
    queue_size: int = Field(
        64,
        ge=1,
        description="Queries admitted (being decoded, waiting or encoding) per modality.",
    )
    batch_window_ms: float = Field(
        5.0,
        ge=0.0,
        le=1000.0,
        description="A batch is sent once no query arrived for this long (or it is full); "
        "0 turns batching off.",
    )
    batch_max_wait_ms: float = Field(
        50.0,
        ge=0.0,
        le=10_000.0,
        description="The longest a query waits for its batch to fill; a value under the batch "
        "window counts as the window.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most queries in one forward pass.")
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After sent with 503 when the queue is full."
    )

    # Index reloading.
    reload_token: SecretStr | None = Field(
        None, description="Bearer token for POST /admin/reload; the endpoint is absent without one."
    )
    poll_interval_s: float = Field(
        0.0, ge=0.0, description="Seconds between checks of CURRENT for a new version; 0 = off."
    )
    verify_on_start: bool = Field(
        True, description="Check the published version's checksums and self-query at start-up."
    )

    # Operations.
    log_level: str = Field("info", description="critical, error, warning, info or debug.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in _LOG_LEVELS:
            raise ValueError(f"expected one of {list(_LOG_LEVELS)}, got {value!r}")
        return value.lower()

    @field_validator("reload_token")
    @classmethod
    def _check_reload_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret == "":
            return None  # VLD_RELOAD_TOKEN= (empty) means "no admin endpoint"
        if len(secret) < 16 or any(c.isspace() for c in secret):
            raise ValueError("must be at least 16 characters with no whitespace")
        return value

    @field_validator("poll_interval_s")
    @classmethod
    def _check_poll_interval(cls, value: float) -> float:
        if 0.0 < value < 0.1:
            raise ValueError(f"must be 0 (off) or at least 0.1 seconds, got {value}")
        return value


def env_name(field: str) -> str:
    """The environment variable that sets ``field``: ``max_k`` → ``VLD_MAX_K``."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with ``overrides`` on top (e.g. from the CLI).

    Raises :class:`SettingsError` listing every invalid setting by its environment variable.
    """
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0])
            shown = "***" if field == "reload_token" else repr(error.get("input"))
            problems.append(f"{env_name(field)}={shown}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from exc


def require_serving_paths(settings: Settings) -> tuple[Path, Path]:
    """``(model_dir, index_root)``, or :class:`SettingsError` naming the variable to set."""
    if settings.model_dir is None:
        raise SettingsError(
            f"{env_name('model_dir')} is not set: point it at a VLDeformer checkpoint directory"
        )
    if settings.index_root is None:
        raise SettingsError(
            f"{env_name('index_root')} is not set: point it at the indexer's output root"
        )
    if not settings.model_dir.is_dir():
        raise SettingsError(f"{env_name('model_dir')}={settings.model_dir}: no such directory")
    if not settings.index_root.is_dir():
        raise SettingsError(f"{env_name('index_root')}={settings.index_root}: no such directory")
    return settings.model_dir, settings.index_root

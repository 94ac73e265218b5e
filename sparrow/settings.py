"""The one settings object.

Built by the CLI or by the tests, never at import time. Every field reads the
environment variable of the same name with the ``SPARROW_`` prefix
(``max_upload_mb`` ← ``SPARROW_MAX_UPLOAD_MB``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARROW_", extra="ignore")

    # Where things live.
    data_dir: Path = Path("./data")
    database_path: Path | None = Field(
        default=None, description="SQLite file; defaults to <data_dir>/sparrow.db"
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/db puts the state and the job "
        "queue in PostgreSQL; unset, SQLite at database_path.",
    )

    # Serving.
    host: str = "127.0.0.1"
    port: int = Field(default=8520, ge=1, le=65535)
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins. Empty: any origin, without credentials.",
    )
    telemetry: Literal["off", "on"] = Field(
        default="off",
        description="on: FastAPI's OpenTelemetry spans, metrics and logs for every request, "
        "to the SDK the process configures (opentelemetry-instrument, say); off: none, and "
        "no request pays for looking for an SDK.",
    )

    # Engines.
    engine: Literal["musicgen", "mock"] = "musicgen"
    mock_step_ms: float = Field(default=2.0, ge=0)
    musicgen_model: str = "facebook/musicgen-small"
    musicgen_decoder: Literal["auto", "sparrow", "transformers"] = Field(
        default="auto",
        description="MusicGen decoding loop: Sparrow's (static cache, CUDA graphs, rows "
        "joining between steps) or transformers' generate; auto: Sparrow's.",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="torch's CPU threads while MusicGen generates on the CPU; 0: one for a "
        "narrow model (the tiny ones), every usable core otherwise.",
    )
    max_batch: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Generation rows (siblings of any requests) decoded as one batch; 1: one "
        "row at a time.",
    )
    engine_process: bool = Field(
        default=True,
        description="MusicGen decodes in a process of its own, beside the server's (whose "
        "Python would otherwise slow every decoding step); off: in a thread of the "
        "server's process. The mock always decodes in the server's process.",
    )
    demucs_model: str = "htdemucs"
    demucs_repo: Path | None = None
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    preload_model: bool = Field(
        default=False, description="Load the model at start-up instead of at the first job."
    )

    ffmpeg: str | None = Field(
        default=None, description="FFmpeg binary; default: ffmpeg on PATH, else the bundled one"
    )

    # Security.
    auth: Literal["off", "on"] = "off"

    # Limits.
    max_upload_mb: float = Field(default=100, gt=0)
    max_upload_s: float = Field(default=600, gt=0)
    max_branch_s: float = Field(default=120, gt=0)
    max_count: int = Field(default=8, ge=1)
    queue_limit: int = Field(default=64, ge=1, description="Jobs waiting, in total, before 429.")
    queue_limit_per_owner: int = Field(
        default=16, ge=1, description="Jobs waiting for one API key before 429 (with auth on)."
    )
    # The cluster (PostgreSQL): who runs jobs, and what happens when a worker dies.
    worker: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: an in-process worker with SQLite, none with PostgreSQL "
        "(sparrow worker processes run the jobs); on: one inside sparrow serve either way; "
        "off: none.",
    )
    worker_stall_s: float = Field(
        default=30,
        gt=0,
        description="A worker silent this long is presumed dead and its job retried elsewhere.",
    )
    job_attempts: int = Field(
        default=2,
        ge=1,
        description="Attempts a job gets when its worker dies under it; the last ends it "
        "interrupted.",
    )
    max_export_s: float = Field(
        default=3600, gt=0, description="Longest spine that can be exported, in seconds."
    )
    export_timeout_s: float = Field(
        default=300, gt=0, description="Wall-clock limit for encoding one export."
    )
    export_concurrency: int = Field(
        default=2, ge=1, description="Exports encoded at the same time; others wait."
    )
    decode_timeout_s: float = Field(
        default=60,
        gt=0,
        description="Wall-clock limit for decoding one upload, or the stored audio a branch "
        "or a separation reads.",
    )
    decode_concurrency: int = Field(
        default=2, ge=1, description="Uploads decoded at the same time; others wait."
    )
    upload_idle_timeout_s: float = Field(
        default=30,
        gt=0,
        description="An upload or request body that sends nothing this long is dropped (408).",
    )
    max_concurrent_uploads: int = Field(
        default=16, ge=1, description="Uploads received or decoded at once; more get 429."
    )

    min_free_mb: float = Field(
        default=64,
        ge=0,
        description="New audio (uploads, generated nodes, stems, exports) is refused with 503 "
        "once the data dir has less than this free.",
    )

    # Events.
    event_retention: int = Field(
        default=10_000, ge=1, description="Events kept per chain for Last-Event-ID replay."
    )
    event_retention_mb: float = Field(
        default=8, gt=0, description="At most this much of each chain's log is kept (MB)."
    )
    sse_keepalive_s: float = Field(default=15, gt=0, description="Keepalive comment interval.")
    sse_queue_limit: int = Field(
        default=256, ge=2, description="Events buffered per subscriber before it is cut off."
    )

    # Also accepted: CF_MUSICGEN_MOCK=1 selects the mock engine.
    cf_musicgen_mock: bool = Field(default=False, validation_alias="CF_MUSICGEN_MOCK")

    @field_validator("database_url")
    @classmethod
    def _postgresql_only(cls, url: SecretStr | None) -> SecretStr | None:
        if url is None or not url.get_secret_value().strip():
            return None
        if not url.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("SPARROW_DATABASE_URL must be a postgresql:// URL (or unset)")
        return url

    @model_validator(mode="after")
    def _mock_alias(self) -> Settings:
        if self.cf_musicgen_mock:
            self.engine = "mock"
        return self

    @model_validator(mode="after")
    def _cors_wildcard_alone(self) -> Settings:
        # "*" means development (no credentials); mixed into a list it would let any
        # origin send credentials.
        origins = self.cors_origin_list
        if "*" in origins and len(origins) > 1:
            raise ValueError("SPARROW_CORS_ORIGINS: use '*' alone or a list of origins")
        return self

    @property
    def db_path(self) -> Path:
        return self.database_path or self.data_dir / "sparrow.db"

    @property
    def event_retention_bytes(self) -> int:
        return int(self.event_retention_mb * 1_000_000)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_mb * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

"""Service settings, read from the environment (`KOALA_*`), e.g. KOALA_DATABASE_URL, KOALA_MAX_CONCURRENT_JOBS.

Nested limits use a double underscore: KOALA_LIMITS__MAX_EPOCHS=50.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.limits import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOALA_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(default=Path("~/.koala"), description="SQLite database, driver logs and run outputs")
    database_url: str = Field(
        default="", description="SQLAlchemy URL (default: SQLite under data_dir); postgresql+psycopg://... for clusters"
    )
    host: str = Field(default="127.0.0.1", description="Address `koala serve` binds")
    port: int = Field(default=8000, ge=1, le=65535)
    migrate_on_start: bool = Field(default=True, description="Upgrade our tables when the API starts")
    run_scheduler: bool = Field(default=True, description="Start queued jobs from this API process (off: API only)")
    max_concurrent_jobs: int = Field(default=1, ge=1, description="Jobs whose drivers run at once")
    heartbeat_seconds: float = Field(default=2.0, gt=0, description="How often a driver proves it is alive")
    stale_seconds: float = Field(default=30.0, gt=0, description="A driver silent this long is taken for dead")
    scheduler_seconds: float = Field(default=1.0, gt=0, description="Scheduler and reconciler period")
    max_driver_starts: int = Field(default=3, ge=1, description="Driver starts per job before it is failed")
    # ---- Ray, when RAY_ADDRESS names no cluster ----
    ray_head: bool = Field(
        default=True,
        description="Run one local Ray head for every job, from start to stop of the service (off: each job's driver "
        "starts a local Ray of its own, which believes it has the whole machine)",
    )
    ray_num_cpus: float | None = Field(
        default=None, gt=0, description="CPUs the service's Ray head offers (default: the machine's)"
    )
    standby_driver: bool = Field(
        default=True,
        description="Keep a job driver started and waiting, its modules loaded, so that a job's first trial starts "
        "within a second of its submission rather than after a driver's start-up",
    )
    # ---- what one job may take: time, disk, patience with a busy database ----
    max_trial_seconds: float = Field(
        default=6 * 3600.0, gt=0, description="Wall-clock seconds a trial may run (a JobSpec may ask for less)"
    )
    max_job_seconds: float = Field(
        default=72 * 3600.0, gt=0, description="Wall-clock seconds a job may run from its start (a JobSpec: less)"
    )
    keep_scratch_seconds: float = Field(
        default=0.0, ge=0, description="Keep an ended job's Tune scratch and checkpoints this long (0: delete at once)"
    )
    db_retry_seconds: float = Field(
        default=120.0, gt=0, description="How long a driver retries a write through a busy or unreachable database"
    )
    limits: Limits = Field(default_factory=Limits)
    optuna_dashboard_url: str | None = Field(default=None, description="Where optuna-dashboard serves this database")
    # ---- exposure: what a client may send, and from where ----
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host header values the API answers (comma-separated; `*.example.org` matches subdomains, `*` "
        "any). Loopback names are always allowed; on a public address with tokens, list the names clients use.",
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, description="Largest request body (413 above)")
    max_queued_jobs_per_owner: int = Field(default=20, ge=1, description="Queued jobs one token may have (429 above)")
    max_running_jobs_per_owner: int = Field(default=2, ge=1, description="Jobs of one token that run at once")
    token_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="How long 'does any token exist' is cached (a new first token takes effect after it)",
    )
    session_seconds: float = Field(default=12 * 3600, gt=0, le=30 * 86400, description="Dashboard session lifetime")
    secure_cookies: bool = Field(default=False, description="Mark the session cookie Secure (always behind TLS)")
    trusted_proxies: str = Field(
        default="", description="Proxy addresses whose X-Forwarded-Proto/-For are believed (uvicorn's list syntax)"
    )
    # ---- uploaded workloads: code a client sends with its job, run on the Ray nodes ----
    allow_uploads: bool = Field(
        default=False,
        description="Every token may upload workload code (otherwise only tokens created with `koala token create "
        "--allow-uploads`; an open server on loopback always may)",
    )
    max_upload_bytes: int = Field(default=20 << 20, ge=1024, le=1 << 31, description="Largest workload pack (413)")
    max_upload_files: int = Field(default=1000, ge=1, le=100_000, description="Most entries in a workload pack")
    max_upload_unpacked_bytes: int = Field(
        default=200 << 20, ge=1024, le=1 << 34, description="Most bytes a workload pack may unpack to"
    )
    allow_package_installs: bool = Field(
        default=False,
        description="Install the requirements.txt of a workload pack with Ray's pip runtime environment (otherwise "
        "a job whose pack has one is refused)",
    )
    upload_retention_seconds: float = Field(
        default=7 * 86400.0,
        ge=0,
        description="Keep an upload this long after the last job that ran it ended (or after its last use)",
    )
    upload_checker: bool = Field(
        default=True,
        description="Keep a warm checker of uploaded workloads on the Ray cluster (an actor with torch loaded, about "
        "0.5 GB), so that a fresh pack is checked in a fraction of a second instead of a new Ray worker's seconds",
    )
    upload_check_seconds: float = Field(
        default=600.0, gt=0, description="How long checking an uploaded workload on the cluster may take (installs too)"
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        return [h.strip().lower() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'koala.db'}"
        return self

    def environment(self) -> dict[str, str]:
        """These settings as KOALA_* variables, for a process this one starts (a job driver)."""
        env = {
            "KOALA_DATA_DIR": str(self.data_dir),
            "KOALA_DATABASE_URL": self.database_url,
            "KOALA_HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
            "KOALA_STALE_SECONDS": str(self.stale_seconds),
            "KOALA_MAX_TRIAL_SECONDS": str(self.max_trial_seconds),
            "KOALA_MAX_JOB_SECONDS": str(self.max_job_seconds),
            "KOALA_KEEP_SCRATCH_SECONDS": str(self.keep_scratch_seconds),
            "KOALA_DB_RETRY_SECONDS": str(self.db_retry_seconds),
            "KOALA_MAX_UPLOAD_FILES": str(self.max_upload_files),
            "KOALA_MAX_UPLOAD_UNPACKED_BYTES": str(self.max_upload_unpacked_bytes),
            "KOALA_ALLOW_PACKAGE_INSTALLS": str(self.allow_package_installs).lower(),
            "KOALA_UPLOAD_CHECK_SECONDS": str(self.upload_check_seconds),
        }
        for key, value in self.limits.model_dump().items():
            env[f"KOALA_LIMITS__{key.upper()}"] = str(value)
        return env

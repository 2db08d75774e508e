"""Our tables (jobs, job events, idempotency keys, API tokens, sessions), beside Optuna's in the same database.

The schema is versioned with Alembic (`service/migrations`) in its own version table, `koala_schema_version`, so it
never touches the `alembic_version` table Optuna keeps for its own schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

jobs = sa.Table(
    "koala_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(32), nullable=True, index=True),  # the API token that created it; NULL: open mode
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("workload", sa.String(200), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("progress", sa.JSON, nullable=False),  # optimizer -> {done, total}
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("driver_pid", sa.Integer, nullable=True),
    sa.Column("driver_host", sa.String(255), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("generation", sa.Integer, nullable=False, default=0),  # taken by each driver start (fencing)
    sa.Column("upload", sa.String(71), nullable=True, index=True),  # "sha256:..." of the workload pack it runs
    sa.Index("ix_koala_jobs_created", "created_at", "id"),
)

events = sa.Table(
    "koala_job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
)

idempotency_keys = sa.Table(
    "koala_idempotency_keys",
    metadata,
    sa.Column("owner", sa.String(32), primary_key=True),  # "" in open mode: keys are scoped per token
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("body_hash", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

api_tokens = sa.Table(
    "koala_api_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),  # sees ownerless (open-mode) jobs
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("allow_uploads", sa.Boolean, nullable=False, default=False),  # may upload workload code
)

sessions = sa.Table(
    "koala_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 of the random session id in the cookie
    sa.Column("token_id", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

ACTIVE_STATES = ("running", "cancelling")
VERSION_TABLE = "koala_schema_version"
MIGRATIONS = Path(__file__).parent.parent / "migrations"  # Alembic's script directory


def now() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: datetime | None) -> datetime | None: ...
def aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def create_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL (readers never block the writer) and a busy timeout."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(engine: Engine) -> None:
    """Bring our tables to the newest schema version (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

"""Our tables (jobs, job events, idempotency keys, API tokens), beside Optuna's in the same database.

The schema is versioned with Alembic (`service/migrations`) in its own version table, `koala_schema_version`, so it
never touches the `alembic_version` table Optuna keeps for its own schema. The database is the source of truth:
the API process, the scheduler and every job driver coordinate only through these rows (state changes are
conditional UPDATEs, so two processes never both claim a job).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from koala_client import models

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
CLAIM_LOCK = 0x6B6F616C61  # PostgreSQL advisory lock key ("koala") that serialises job claims


class IdempotencyConflictError(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for job {job_id} with a different request body")
        self.job_id = job_id


class BadCursorError(ValueError):
    pass


class FencedError(Exception):
    """A driver's write was refused: the job is no longer its own (another driver took over, or the job ended)."""


def now() -> datetime:
    return datetime.now(UTC)


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: datetime | None) -> datetime | None: ...
def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def body_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def token_hash(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain SHA-256 is a safe one-way storage form (no password stretching).
    return hashlib.sha256(token.encode()).hexdigest()


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


@dataclass(frozen=True)
class JobRow:
    id: str
    owner: str | None
    name: str
    workload: str
    spec: dict[str, Any]
    state: str
    error: str | None
    progress: dict[str, dict[str, int]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    driver_pid: int | None
    driver_host: str | None
    attempts: int
    generation: int
    upload: str | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> JobRow:
        values = dict(row._mapping)
        for key in ("created_at", "started_at", "finished_at", "heartbeat_at"):
            values[key] = _aware(values[key])
        return cls(**values)

    def to_schema(self) -> models.Job:
        progress = {name: models.OptimizerProgress(**p) for name, p in self.progress.items()}
        return models.Job(
            id=self.id,
            name=self.name,
            workload=self.workload,
            optimizers=list(self.progress),
            state=self.state,  # type: ignore[arg-type]
            spec=self.spec,
            progress=progress,
            trials_done=sum(p.done for p in progress.values()),
            trials_total=sum(p.total for p in progress.values()),
            error=self.error,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            attempts=self.attempts,
            upload=models.JobUpload(digest=self.upload) if self.upload else None,
        )


class Store:
    """Access to our tables. Thread-safe; one per process."""

    def __init__(self, url: str, token_cache_seconds: float = 2.0) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.token_cache_seconds = token_cache_seconds
        self._tokens_cache: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    # ---- schema ----------------------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring our tables to the newest schema version (idempotent)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    # ---- jobs ------------------------------------------------------------------------------------------------------

    def create_job(
        self,
        spec: Mapping[str, Any],
        *,
        name: str,
        workload: str,
        progress: Mapping[str, Mapping[str, int]],
        owner: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        upload: str | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job; returns (job, created). With an idempotency key already used for the same request
        body, returns the earlier job and False; for another body, raises IdempotencyConflictError."""
        job_id = uuid.uuid4().hex[:12]
        created = now()
        try:
            with self.engine.begin() as db:
                if idempotency_key is not None:
                    earlier = self._idempotent_job(db, owner, idempotency_key, request_hash)
                    if earlier is not None:
                        return earlier, False
                    db.execute(
                        idempotency_keys.insert().values(
                            owner=owner or "",
                            key=idempotency_key,
                            body_hash=request_hash or "",
                            job_id=job_id,
                            created_at=created,
                        )
                    )
                db.execute(
                    jobs.insert().values(
                        id=job_id,
                        owner=owner,
                        name=name,
                        workload=workload,
                        spec=dict(spec),
                        state="queued",
                        progress={k: dict(v) for k, v in progress.items()},
                        created_at=created,
                        attempts=0,
                        upload=upload,
                    )
                )
                self._event(db, job_id, "state", {"state": "queued"})
        except sa.exc.IntegrityError:
            # A concurrent request with the same key won the insert: answer like a repeat of it.
            assert idempotency_key is not None
            with self.engine.connect() as db:
                earlier = self._idempotent_job(db, owner, idempotency_key, request_hash)
            if earlier is None:
                raise
            return earlier, False
        job = self.get_job(job_id)
        assert job is not None
        return job, True

    def _idempotent_job(self, db: Connection, owner: str | None, key: str, request_hash: str | None) -> JobRow | None:
        row = db.execute(
            sa.select(idempotency_keys).where(idempotency_keys.c.owner == (owner or ""), idempotency_keys.c.key == key)
        ).first()
        if row is None:
            return None
        if row.body_hash != (request_hash or ""):
            raise IdempotencyConflictError(key, row.job_id)
        job = db.execute(sa.select(jobs).where(jobs.c.id == row.job_id)).first()
        return JobRow.from_row(job) if job is not None else None

    def get_job(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return JobRow.from_row(row) if row is not None else None

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        restrict_owner: bool = False,
        include_ownerless: bool = False,
        states: Sequence[str] = (),
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRow], str | None]:
        """Jobs newest first. `restrict_owner`: only `owner`'s jobs, plus the ownerless ones (created in open mode)
        with `include_ownerless`. Returns (page, next cursor)."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if restrict_owner:
            mine = jobs.c.owner == owner
            query = query.where(sa.or_(mine, jobs.c.owner.is_(None)) if include_ownerless else mine)
        if states:
            query = query.where(jobs.c.state.in_(list(states)))
        if cursor:
            created, job_id = decode_cursor(cursor)
            query = query.where(
                sa.or_(jobs.c.created_at < created, sa.and_(jobs.c.created_at == created, jobs.c.id < job_id))
            )
        with self.engine.connect() as db:
            rows = [JobRow.from_row(r) for r in db.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1]) if more else None

    def jobs_in(self, states: Sequence[str]) -> list[JobRow]:
        with self.engine.connect() as db:
            query = sa.select(jobs).where(jobs.c.state.in_(list(states))).order_by(jobs.c.created_at, jobs.c.id)
            return [JobRow.from_row(r) for r in db.execute(query)]

    # Time is the database's: heartbeats are written, and staleness judged, by one clock whatever host a driver or
    # scheduler runs on.

    def _db_now(self, offset_seconds: float = 0.0) -> sa.ColumnElement[Any]:
        """The database's current time plus `offset_seconds`, as an SQL expression."""
        if self.engine.dialect.name == "sqlite":
            # SQLite has no datetime type: this is the text form SQLAlchemy stores, so comparisons with stored values
            # are exact (to the millisecond).
            return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{offset_seconds:+.3f} seconds")
        current = sa.func.now()
        if not offset_seconds:
            return current
        return current + sa.literal(timedelta(seconds=offset_seconds), sa.Interval())

    def db_now(self) -> datetime:
        """The database's current time (UTC)."""
        with self.engine.connect() as db:
            value = db.execute(sa.select(sa.type_coerce(self._db_now(), sa.DateTime(timezone=True)))).scalar_one()
        aware = _aware(value)
        assert aware is not None
        return aware

    def silent_jobs(self, stale_seconds: float) -> set[str]:
        """Active jobs whose driver has not written a heartbeat for `stale_seconds` by the database's clock."""
        query = sa.select(jobs.c.id).where(jobs.c.state.in_(ACTIVE_STATES), self._silent(stale_seconds))
        with self.engine.connect() as db:
            return set(db.execute(query).scalars())

    def _silent(self, stale_seconds: float) -> sa.ColumnElement[bool]:
        return sa.or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < self._db_now(-stale_seconds))

    def _transition(
        self,
        db: Connection,
        job_id: str,
        from_states: Sequence[str],
        to_state: str,
        reason: str | None = None,
        *,
        at_generation: int | None = None,
        conditions: Sequence[sa.ColumnElement[bool]] = (),
        **values: Any,
    ) -> bool:
        """Move the job to `to_state` if it is in one of `from_states` (and still at `at_generation`, if given), with
        a `state` event; False otherwise."""
        where = [jobs.c.id == job_id, jobs.c.state.in_(list(from_states)), *conditions]
        if at_generation is not None:
            where.append(jobs.c.generation == at_generation)
        result = db.execute(jobs.update().where(*where).values(state=to_state, **values))
        changed = result.rowcount == 1
        if changed:
            data = {"state": to_state}
            if values.get("error"):
                data["error"] = values["error"]
            if reason:
                data["reason"] = reason
            self._event(db, job_id, "state", data)
        return changed

    # ---- claiming: one job per driver start, never more active jobs than the cap ----------------------------------

    @contextlib.contextmanager
    def _serialized(self) -> Iterator[Connection]:
        """A transaction holding the claim lock, so claims (which count the active jobs) happen one at a time across
        every process: SQLite's write lock from BEGIN IMMEDIATE on; on PostgreSQL a transaction-scoped advisory lock
        (under READ COMMITTED each statement then sees every claim committed before it)."""
        with self.engine.connect() as db:
            if db.dialect.name == "sqlite":
                db.exec_driver_sql("BEGIN IMMEDIATE")
            elif db.dialect.name == "postgresql":
                db.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK)))
            yield db
            db.commit()

    def claim(self, job_id: str, host: str, *, max_active: int | None = None) -> int | None:
        """queued -> running for the scheduler that wins the race (and, with `max_active`, only while fewer jobs
        are running or cancelling). Counts a driver start and takes the job's next generation, which it returns;
        None when the job was not claimed."""
        with self._serialized() as db:
            return self._claim(db, job_id, host, max_active)

    def claim_next(self, host: str, max_active: int, max_active_per_owner: int | None = None) -> tuple[str, int] | None:
        """Claim the next queued job, if fewer than `max_active` jobs are active: returns (job id, generation).

        Owners take turns: the next job is the oldest queued one of the owner whose most recent start is oldest (an
        owner with no start yet first; ownerless jobs are one owner), so one owner's queue cannot starve another's.
        With `max_active_per_owner`, an owner (API token) with that many active jobs waits; ownerless jobs (open mode)
        are capped by `max_active` alone."""
        earlier = jobs.alias("earlier")
        last_start = (
            sa.select(sa.func.max(earlier.c.started_at))
            .where(earlier.c.owner.is_not_distinct_from(jobs.c.owner))
            .scalar_subquery()
        )
        query = sa.select(jobs.c.id).where(jobs.c.state == "queued")
        if max_active_per_owner is not None:
            mine = jobs.alias("mine")
            owner_active = (
                sa.select(sa.func.count())
                .select_from(mine)
                .where(mine.c.owner.is_not_distinct_from(jobs.c.owner), mine.c.state.in_(ACTIVE_STATES))
                .scalar_subquery()
            )
            query = query.where(sa.or_(jobs.c.owner.is_(None), owner_active < max_active_per_owner))
        query = query.order_by(last_start.asc().nulls_first(), jobs.c.created_at, jobs.c.id).limit(1)
        with self.engine.connect() as db:  # nothing to claim: no need for the lock (SQLite's is the write lock)
            if db.execute(query).first() is None or len(self._active(db)) >= max_active:
                return None
        with self._serialized() as db:
            job_id = db.execute(query).scalar()
            if job_id is None:
                return None
            generation = self._claim(db, job_id, host, max_active)
            return (job_id, generation) if generation is not None else None

    @staticmethod
    def _active(db: Connection) -> list[str]:
        return list(db.execute(sa.select(jobs.c.id).where(jobs.c.state.in_(ACTIVE_STATES))).scalars())

    def _claim(self, db: Connection, job_id: str, host: str, max_active: int | None) -> int | None:
        conditions = []
        if max_active is not None:  # the cap, checked by the update itself (under the claim lock)
            others = jobs.alias("others")
            active = (
                sa.select(sa.func.count())
                .select_from(others)
                .where(others.c.state.in_(ACTIVE_STATES))
                .scalar_subquery()
            )
            conditions.append(active < max_active)
        started = self._db_now()
        claimed = self._transition(
            db,
            job_id,
            ["queued"],
            "running",
            conditions=conditions,
            attempts=jobs.c.attempts + 1,
            generation=jobs.c.generation + 1,
            heartbeat_at=started,
            driver_pid=None,
            driver_host=host,
            started_at=sa.func.coalesce(jobs.c.started_at, started),
        )
        if not claimed:
            return None
        return int(db.execute(sa.select(jobs.c.generation).where(jobs.c.id == job_id)).scalar_one())

    # ---- a driver's writes: each conditional on its generation (fencing) ------------------------------------------

    def _fenced_update(self, db: Connection, job_id: str, generation: int | None, **values: Any) -> None:
        """UPDATE the job's row as its driver of `generation`; FencedError when the job is no longer that driver's
        (another driver took over, or the job left running/cancelling). Without a generation, unconditional."""
        where = [jobs.c.id == job_id]
        if generation is not None:
            where += [jobs.c.generation == generation, jobs.c.state.in_(ACTIVE_STATES)]
        # With nothing to set, a no-op update still takes the row's write lock until the transaction ends.
        result = db.execute(jobs.update().where(*where).values(**(values or {"generation": jobs.c.generation})))
        if result.rowcount != 1 and generation is not None:
            row = db.execute(sa.select(jobs.c.state, jobs.c.generation).where(jobs.c.id == job_id)).first()
            now_is = f"generation {row.generation}, {row.state}" if row is not None else "gone"
            raise FencedError(f"job {job_id} is no longer this driver's (generation {generation}): now {now_is}")

    def check_driver(self, job_id: str, generation: int) -> None:
        """Raise FencedError unless `generation` is the job's current driver and the job is running or cancelling."""
        query = sa.select(jobs.c.state, jobs.c.generation).where(jobs.c.id == job_id)
        with self.engine.connect() as db:
            row = db.execute(query).first()
        if row is None or row.generation != generation or row.state not in ACTIVE_STATES:
            now_is = f"generation {row.generation}, {row.state}" if row is not None else "gone"
            raise FencedError(f"job {job_id} is no longer this driver's (generation {generation}): now {now_is}")

    def set_driver(
        self, job_id: str, pid: int, host: str, *, generation: int | None = None, grace_seconds: float = 0.0
    ) -> bool:
        """Record the driver process of the job's current start (of `generation`, if given). `grace_seconds`: the
        driver counts as alive that much longer than a heartbeat now would make it, for the seconds a new driver
        spends loading its modules before its first heartbeat."""
        where = [jobs.c.id == job_id]
        if generation is not None:
            where.append(jobs.c.generation == generation)
        values = {"driver_pid": pid, "driver_host": host, "heartbeat_at": self._db_now(grace_seconds)}
        with self.engine.begin() as db:
            result = db.execute(jobs.update().where(*where).values(**values))
        return result.rowcount == 1

    def heartbeat(self, job_id: str, generation: int | None = None) -> str | None:
        """Record that the driver is alive; returns the job's state (a driver stops when it reads `cancelling`).
        With `generation`: FencedError when the job is no longer that driver's."""
        with self.engine.begin() as db:
            self._fenced_update(db, job_id, generation, heartbeat_at=self._db_now())
            return db.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Idempotent: queued -> cancelled at once, running -> cancelling (the driver stops and ends it)."""
        with self.engine.begin() as db:
            if not self._transition(db, job_id, ["queued"], "cancelled", finished_at=self._db_now()):
                self._transition(db, job_id, ["running"], "cancelling")
        return self.get_job(job_id)

    def finish(self, job_id: str, state: str, error: str | None = None, *, generation: int | None = None) -> bool:
        """running/cancelling -> succeeded, failed or cancelled (a cancel request wins over success). With
        `generation`, only while the job is still at that generation (its driver's, or the one a reconciler saw)."""
        with self.engine.begin() as db:
            current = db.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            if current == "cancelling" and state == "succeeded":
                state = "cancelled"
            return self._transition(
                db, job_id, ACTIVE_STATES, state, at_generation=generation, error=error, finished_at=self._db_now()
            )

    def requeue(
        self,
        job_id: str,
        reason: str,
        *,
        generation: int | None = None,
        silent_for: float | None = None,
        count_start: bool = True,
    ) -> bool:
        """running -> queued, to resume a job whose driver died: only while the job is at `generation` (if given) and
        its driver has been silent for `silent_for` seconds (if given), so a stale view never requeues a newer
        driver's job. `count_start=False`: the start being ended does not count towards `max_driver_starts` (its
        driver handed the job back because the service's Ray went away, through no fault of the job)."""
        conditions = [self._silent(silent_for)] if silent_for is not None else []
        refund = {} if count_start else {"attempts": jobs.c.attempts - 1}
        with self.engine.begin() as db:
            return self._transition(
                db,
                job_id,
                ["running"],
                "queued",
                reason,
                at_generation=generation,
                conditions=conditions,
                driver_pid=None,
                heartbeat_at=None,
                **refund,
            )

    def set_progress(
        self, job_id: str, progress: Mapping[str, Mapping[str, int]], *, generation: int | None = None
    ) -> None:
        with self.engine.begin() as db:
            self._fenced_update(db, job_id, generation, progress={k: dict(v) for k, v in progress.items()})

    def ended_before(self, job_ids: Sequence[str], seconds: float) -> set[str]:
        """Those of `job_ids` that ended (succeeded, failed, cancelled) at least `seconds` ago by the database's
        clock."""
        if not job_ids:
            return set()
        query = sa.select(jobs.c.id).where(
            jobs.c.id.in_(list(job_ids)),
            jobs.c.state.in_(list(models.TERMINAL_STATES)),
            sa.or_(jobs.c.finished_at.is_(None), jobs.c.finished_at <= self._db_now(-seconds)),
        )
        with self.engine.connect() as db:
            return set(db.execute(query).scalars())

    # ---- events ----------------------------------------------------------------------------------------------------

    def _event(self, db: Connection, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        db.execute(events.insert().values(job_id=job_id, at=now(), kind=kind, data=dict(data)))

    def add_event(self, job_id: str, kind: str, data: Mapping[str, Any], *, generation: int | None = None) -> None:
        """Append an event; with `generation`, as that driver of the job (FencedError when it no longer is)."""
        with self.engine.begin() as db:
            if generation is not None:
                self._fenced_update(db, job_id, generation)
            self._event(db, job_id, kind, data)

    def events_after(self, job_id: str, after: int = 0, limit: int = 500) -> list[models.Event]:
        query = (
            sa.select(events).where(events.c.job_id == job_id, events.c.id > after).order_by(events.c.id).limit(limit)
        )
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [models.Event(id=r.id, job_id=r.job_id, kind=r.kind, at=_aware(r.at), data=r.data) for r in rows]

    # ---- API tokens and sessions ----------------------------------------------------------------------------------

    def create_token(self, name: str = "", *, admin: bool = False, allow_uploads: bool = False) -> models.TokenCreated:
        """A new API token (only its hash is stored). Names are unique, so `koala token revoke NAME` is unambiguous.
        `allow_uploads`: it may upload workload code even where the server does not allow that to every token."""
        token = "koala_" + secrets.token_urlsafe(32)
        token_id = uuid.uuid4().hex[:12]
        name = name or f"token-{token_id}"
        with self.engine.begin() as db:
            if db.execute(sa.select(api_tokens.c.id).where(api_tokens.c.name == name)).first() is not None:
                raise ValueError(f"a token named {name!r} exists already")
            db.execute(
                api_tokens.insert().values(
                    id=token_id,
                    name=name,
                    token_hash=token_hash(token),
                    created_at=now(),
                    admin=admin,
                    allow_uploads=allow_uploads,
                )
            )
        self._tokens_cache = None
        return models.TokenCreated(id=token_id, name=name, token=token, admin=admin, allow_uploads=allow_uploads)

    def list_tokens(self) -> list[models.TokenInfo]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(api_tokens).order_by(api_tokens.c.created_at)).all()
        return [
            models.TokenInfo(
                id=r.id,
                name=r.name,
                admin=bool(r.admin),
                created_at=_aware(r.created_at),
                revoked_at=_aware(r.revoked_at),
                allow_uploads=bool(r.allow_uploads),
            )
            for r in rows
        ]

    def revoke_token(self, name_or_id: str) -> models.TokenInfo | None:
        """Revoke a token (by name or id) and end its sessions at once; None when there is no such token."""
        with self.engine.begin() as db:
            where = sa.or_(api_tokens.c.id == name_or_id, api_tokens.c.name == name_or_id)
            row = db.execute(sa.select(api_tokens).where(where)).first()
            if row is None:
                return None
            revoked = _aware(row.revoked_at) or now()
            db.execute(api_tokens.update().where(api_tokens.c.id == row.id).values(revoked_at=revoked))
            db.execute(sessions.delete().where(sessions.c.token_id == row.id))
        return models.TokenInfo(
            id=row.id,
            name=row.name,
            admin=bool(row.admin),
            created_at=_aware(row.created_at),
            revoked_at=revoked,
            allow_uploads=bool(row.allow_uploads),
        )

    def token_identity(self, token: str) -> tuple[str, bool, bool] | None:
        """(token id, admin, allow_uploads) of a live token, or None when it is unknown or revoked."""
        query = sa.select(api_tokens.c.id, api_tokens.c.admin, api_tokens.c.allow_uploads).where(
            api_tokens.c.token_hash == token_hash(token), api_tokens.c.revoked_at.is_(None)
        )
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return (row.id, bool(row.admin), bool(row.allow_uploads)) if row is not None else None

    def token_owner(self, token: str) -> str | None:
        """The id of a live token, or None when it is unknown or revoked."""
        identity = self.token_identity(token)
        return identity[0] if identity else None

    def has_tokens(self, max_age: float | None = None) -> bool:
        """Whether any API token was ever created (auth is on; revoking every token does not open the server),
        cached for `max_age` (default: token_cache_seconds): tokens are created by another process."""
        max_age = self.token_cache_seconds if max_age is None else max_age
        with self._lock:
            cached = self._tokens_cache
            if cached is not None and time.monotonic() - cached[0] < max_age:
                return cached[1]
        with self.engine.connect() as db:
            exists = db.execute(sa.select(sa.func.count()).select_from(api_tokens)).scalar_one() > 0
        with self._lock:
            self._tokens_cache = (time.monotonic(), exists)
        return exists

    def create_session(self, token_id: str, lifetime_seconds: float) -> str:
        """A dashboard session for a token: returns the random session id for the cookie (stored hashed)."""
        session_id = secrets.token_urlsafe(32)
        created = now()
        with self.engine.begin() as db:
            db.execute(sessions.delete().where(sessions.c.expires_at < created))  # expired ones, opportunistically
            db.execute(
                sessions.insert().values(
                    id_hash=token_hash(session_id),
                    token_id=token_id,
                    created_at=created,
                    expires_at=created + timedelta(seconds=lifetime_seconds),
                )
            )
        return session_id

    def session_identity(self, session_id: str) -> tuple[str, bool, bool] | None:
        """(token id, admin, allow_uploads) of a live session (not expired, its token not revoked), or None."""
        query = (
            sa.select(api_tokens.c.id, api_tokens.c.admin, api_tokens.c.allow_uploads)
            .select_from(sessions.join(api_tokens, sessions.c.token_id == api_tokens.c.id))
            .where(
                sessions.c.id_hash == token_hash(session_id),
                sessions.c.expires_at > now(),
                api_tokens.c.revoked_at.is_(None),
            )
        )
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return (row.id, bool(row.admin), bool(row.allow_uploads)) if row is not None else None

    def end_session(self, session_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(sessions.delete().where(sessions.c.id_hash == token_hash(session_id)))

    def count_jobs(self, owner: str | None, states: Sequence[str]) -> int:
        """How many of `owner`'s jobs (ownerless ones for None) are in `states`."""
        owned = jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner
        query = sa.select(sa.func.count()).select_from(jobs).where(owned, jobs.c.state.in_(list(states)))
        with self.engine.connect() as db:
            return int(db.execute(query).scalar_one())

    def ping(self) -> None:
        with self.engine.connect() as db:
            db.execute(sa.select(1))


def encode_cursor(job: JobRow) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        parsed = datetime.fromisoformat(created)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursorError("cursor is not one this server issued; pass next_cursor from a previous page") from None
    return parsed, job_id

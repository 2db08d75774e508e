"""Jobs: creation (with idempotency keys), reading and paging, cancel requests, and their events."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from koala_client import models
from service.store.base import StoreBase
from service.store.tables import aware, events, idempotency_keys, jobs, now


class IdempotencyConflictError(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for job {job_id} with a different request body")
        self.job_id = job_id


class BadCursorError(ValueError):
    pass


def body_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
            values[key] = aware(values[key])
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


class JobStore(StoreBase):
    """Jobs as the API sees them: create, read, page, cancel, and their events."""

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

    def count_jobs(self, owner: str | None, states: Sequence[str]) -> int:
        """How many of `owner`'s jobs (ownerless ones for None) are in `states`."""
        owned = jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner
        query = sa.select(sa.func.count()).select_from(jobs).where(owned, jobs.c.state.in_(list(states)))
        with self.engine.connect() as db:
            return int(db.execute(query).scalar_one())

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

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Idempotent: queued -> cancelled at once, running -> cancelling (the driver stops and ends it)."""
        with self.engine.begin() as db:
            if not self._transition(db, job_id, ["queued"], "cancelled", finished_at=self._db_now()):
                self._transition(db, job_id, ["running"], "cancelling")
        return self.get_job(job_id)

    # ---- events ----------------------------------------------------------------------------------------------------

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
        return [models.Event(id=r.id, job_id=r.job_id, kind=r.kind, at=aware(r.at), data=r.data) for r in rows]

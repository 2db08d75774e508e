"""What every part of the Store shares: the engine, the database's clock, state transitions and fenced writes.

The database is the source of truth: the API process, the scheduler and every job driver coordinate only through
these rows (state changes are conditional UPDATEs, so two processes never both claim a job).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.store.tables import ACTIVE_STATES, aware, create_engine, events, jobs, migrate, now


class FencedError(Exception):
    """A driver's write was refused: the job is no longer its own (another driver took over, or the job ended)."""


class StoreBase:
    """The engine and the helpers that the job, driver and token parts of `Store` build on."""

    def __init__(self, url: str, token_cache_seconds: float = 2.0) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.token_cache_seconds = token_cache_seconds
        self._tokens_cache: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    # ---- schema ----------------------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring our tables to the newest schema version (idempotent)."""
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as db:
            db.execute(sa.select(1))

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
        return aware(value)

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

    def _event(self, db: Connection, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        db.execute(events.insert().values(job_id=job_id, at=now(), kind=kind, data=dict(data)))

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

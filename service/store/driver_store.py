"""A job's drivers: the atomic round-robin claim that starts one, and each driver's writes fenced by generation.

A claim takes the job's next generation; every later write of that driver is conditional on it, so a driver that
lost its job (requeued after it went silent, or ended) can no longer change it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.store.base import FencedError, StoreBase
from service.store.tables import ACTIVE_STATES, jobs

CLAIM_LOCK = 0x6B6F616C61  # PostgreSQL advisory lock key ("koala") that serialises job claims


class DriverStore(StoreBase):
    """Claims, heartbeats, progress and ends of jobs, as the scheduler and the drivers write them."""

    def silent_jobs(self, stale_seconds: float) -> set[str]:
        """Active jobs whose driver has not written a heartbeat for `stale_seconds` by the database's clock."""
        query = sa.select(jobs.c.id).where(jobs.c.state.in_(ACTIVE_STATES), self._silent(stale_seconds))
        with self.engine.connect() as db:
            return set(db.execute(query).scalars())

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

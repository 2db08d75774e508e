"""Bounded retries of database operations through a busy or briefly unreachable database.

A job driver writes while other processes use the same database: on SQLite another connection may hold the write
lock longer than the busy timeout ("database is locked"), and a PostgreSQL server may restart or drop connections.
`retry` runs an operation again with exponential backoff while it fails with such a transient error, for at most a
time budget, and then raises `DatabaseUnavailableError`, which names what was being written and the last error. Any
other error (a constraint, a bug, a fenced driver) is raised at once.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BUDGET_SECONDS = 120.0
SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy", "disk i/o error")


class DatabaseUnavailableError(RuntimeError):
    """A database operation kept failing with transient errors for longer than its retry budget."""


def is_transient(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from, e.g. inside Optuna's StorageInternalError) is one a retry
    may cure: a locked SQLite database, a lost or refused connection, a PostgreSQL shutdown or serialization
    failure."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (sa.exc.DisconnectionError, sa.exc.TimeoutError)):  # pool: no connection to be had
            return True
        if isinstance(current, sqlite3.OperationalError):
            return any(text in str(current).lower() for text in SQLITE_TRANSIENT)
        if _is_psycopg_operational(current):
            return True
        if isinstance(current, sa.exc.DBAPIError) and current.orig is not None and current.orig is not current:
            current = current.orig
            continue
        current = current.__cause__ or current.__context__
    return False


def _is_psycopg_operational(error: BaseException) -> bool:
    # Connection failures, administrator shutdowns, serialization failures and deadlocks; psycopg is only there
    # where PostgreSQL is used.
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency, but keep SQLite-only installs working
        return False
    return isinstance(error, psycopg.OperationalError)


def describe(error: BaseException) -> str:
    """The first line of an error, or of its cause when it wraps one (Optuna's StorageInternalError does)."""
    cause = error.__cause__ if error.__cause__ is not None and not isinstance(error, sa.exc.SQLAlchemyError) else error
    text = str(cause).strip()
    return (text.splitlines()[0] if text else type(cause).__name__)[:300]


def retry(
    operation: Callable[[], T],
    *,
    what: str,
    budget: float = DEFAULT_BUDGET_SECONDS,
    first_delay: float = 0.1,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation` until it succeeds, retrying transient database errors with exponential backoff (from
    `first_delay` to `max_delay` seconds) for at most `budget` seconds; then raise DatabaseUnavailableError saying
    `what` was being done. Non-transient errors propagate at once."""
    started = time.monotonic()
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as error:
            if not is_transient(error):
                raise
            waited = time.monotonic() - started
            if waited + delay > budget:
                raise DatabaseUnavailableError(
                    f"the database stayed unavailable for {waited:.0f} s ({attempt} attempts) while {what}: "
                    f"{describe(error)}"
                ) from error
            log.warning(
                "database busy while %s (attempt %d): %s; retry in %.1f s", what, attempt, describe(error), delay
            )
            sleep(delay)
            delay = min(delay * 2, max_delay)

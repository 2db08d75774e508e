"""Our tables beside Optuna's, and `Store`, the one way the service reads and writes them.

The database is the source of truth: the API process, the scheduler and every job driver coordinate only through
these rows (state changes are conditional UPDATEs, so two processes never both claim a job). `Store` is assembled
from one part per concept:

- `tables`: the table definitions, the engine and the schema version (Alembic, `service/migrations`);
- `base`: the database's clock, state transitions and fenced writes, which the parts below share;
- `job_store`: jobs as the API sees them (idempotent creation, pages, cancel) and their events;
- `driver_store`: the atomic round-robin claim, heartbeats, progress and ends, fenced by generation;
- `token_store`: API tokens and dashboard sessions.

Everything callers use is importable from here.
"""

from service.store.base import FencedError
from service.store.driver_store import DriverStore
from service.store.job_store import (
    BadCursorError,
    IdempotencyConflictError,
    JobRow,
    JobStore,
    body_hash,
    decode_cursor,
    encode_cursor,
)
from service.store.tables import (
    ACTIVE_STATES,
    VERSION_TABLE,
    api_tokens,
    create_engine,
    events,
    idempotency_keys,
    jobs,
    metadata,
    now,
    sessions,
)
from service.store.token_store import TokenStore, token_hash


class Store(JobStore, DriverStore, TokenStore):
    """Access to our tables. Thread-safe; one per process."""


__all__ = [
    "ACTIVE_STATES",
    "VERSION_TABLE",
    "BadCursorError",
    "FencedError",
    "IdempotencyConflictError",
    "JobRow",
    "Store",
    "api_tokens",
    "body_hash",
    "create_engine",
    "decode_cursor",
    "encode_cursor",
    "events",
    "idempotency_keys",
    "jobs",
    "metadata",
    "now",
    "sessions",
    "token_hash",
]

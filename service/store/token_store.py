"""API tokens and dashboard sessions: only hashes are stored."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa

from koala_client import models
from service.store.base import StoreBase
from service.store.tables import api_tokens, aware, now, sessions


def token_hash(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain SHA-256 is a safe one-way storage form (no password stretching).
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore(StoreBase):
    """Who may call the API: tokens (created, listed, revoked) and the dashboard's sessions built on them."""

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
                created_at=aware(r.created_at),
                revoked_at=aware(r.revoked_at),
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
            revoked = aware(row.revoked_at) or now()
            db.execute(api_tokens.update().where(api_tokens.c.id == row.id).values(revoked_at=revoked))
            db.execute(sessions.delete().where(sessions.c.token_id == row.id))
        return models.TokenInfo(
            id=row.id,
            name=row.name,
            admin=bool(row.admin),
            created_at=aware(row.created_at),
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

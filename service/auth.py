"""Who may call the API, and the checks every request passes before any route reads it.

Callers: bearer tokens created with `koala token create` (stored hashed; `--admin` tokens also see the ownerless
jobs made while the server ran open), or the dashboard's session cookie, which holds a random session id (stored
hashed, with an expiry) and never the token. Without any token the API is open, which is allowed only on a loopback
address. A revoked token and its sessions stop working at once (identities are never cached; only "does any token
exist" is, briefly).

`Guard`, an ASGI middleware in front of everything, answers before the application reads a request:
- the `Host` header must be one this server answers to (DNS rebinding: a hostile page whose name resolves to
  127.0.0.1 would otherwise drive an open server from the browser);
- a body larger than `max_body_bytes` (`max_upload_bytes` for POST /v1/uploads) is 413, by its Content-Length or
  as it streams in;
- on a server with tokens, a request to /v1 without a valid credential is 401 before its body is read;
- a state-changing request that is not authenticated by a bearer token (a cookie, or open mode) must come from this
  server's own pages: `Sec-Fetch-Site` same-origin/none and `Origin` equal to the request's host, when sent (CSRF).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import ProblemError
from service.settings import Settings
from service.store import JobRow, Store

SESSION_COOKIE = "koala_session"  # the dashboard's session id (HttpOnly, SameSite=Strict; Secure behind TLS)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v1/workloads", "/v1/optimizers"})  # answer without a token
UPLOADS_PATH = "/v1/uploads"  # POST: a workload pack, whose size limit is its own


@dataclass(frozen=True)
class Caller:
    """Who is calling: `owner` is the token id (None in open mode); `restricted` when tokens are configured;
    `admin` tokens also see ownerless jobs; `bearer` when authenticated by the Authorization header;
    `allow_uploads` when the token may upload workload code whatever the server's setting (open mode: the user owns
    the machine)."""

    owner: str | None
    restricted: bool
    admin: bool = False
    bearer: bool = False
    allow_uploads: bool = False

    def may_see(self, job: JobRow) -> bool:
        if not self.restricted:
            return True
        return job.owner == self.owner if job.owner is not None else self.admin


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def identify(store: Store, headers: Headers, cookies: dict[str, str]) -> Caller:
    """The caller behind a request's bearer token or session cookie; raises ProblemError(401) when tokens exist
    and neither is valid."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if not store.has_tokens():
        return Caller(None, restricted=False, admin=True, bearer=scheme.lower() == "bearer", allow_uploads=True)
    if scheme.lower() == "bearer" and token.strip():
        identity = store.token_identity(token.strip())
        if identity is None:
            raise ProblemError(401, "Unauthorized", "unknown or revoked API token")
        return Caller(identity[0], restricted=True, admin=identity[1], bearer=True, allow_uploads=identity[2])
    session_id = cookies.get(SESSION_COOKIE, "").strip()
    if session_id:
        identity = store.session_identity(session_id)
        if identity is None:
            raise ProblemError(401, "Unauthorized", "the session has expired or was ended: sign in again")
        return Caller(identity[0], restricted=True, admin=identity[1], allow_uploads=identity[2])
    raise ProblemError(401, "Unauthorized", "this server needs an API token: send `Authorization: Bearer TOKEN`")


# Cheap reads (an indexed row, WAL mode: never blocked by a writer) run on the event loop: a thread hop costs more
# than the query.
async def caller(request: Request) -> Caller:
    """The caller, as `Guard` identified it (or identified now, for a route Guard lets through unchecked); routes
    take it as the `Auth` dependency (service/api/deps.py)."""
    known = request.scope.get("state", {}).get("caller")
    if isinstance(known, Caller):
        return known
    return identify(request.app.state.store, request.headers, request.cookies)


class ExposureError(RuntimeError):
    """The server would be reachable from other machines without authentication."""


def check_exposure(settings: Settings, store: Store) -> bool:
    """Whether the API runs open (no tokens). Raises ExposureError when open on a non-loopback address."""
    if store.has_tokens(max_age=0):
        return False
    if not is_loopback(settings.host):
        raise ExposureError(
            f"refusing to serve on {settings.host} without API tokens: anyone who can reach it could run jobs. "
            "Create a token with `koala token create` (then pass it as KOALA_TOKEN), or bind 127.0.0.1."
        )
    return True


def host_allowed(settings: Settings, host_header: str) -> bool:
    """Whether `Host: host_header` names this server: a loopback name, the bound address, or an allowed host."""
    host = _hostname(host_header)
    if not host:
        return False
    if host in LOOPBACK_NAMES or is_loopback(host):
        return True
    if host == settings.host.lower() and settings.host not in ("0.0.0.0", "::"):
        return True
    for allowed in settings.allowed_hosts:
        if allowed == "*" or allowed == host or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return True
    return False


def _hostname(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_origin(headers: Headers) -> bool:
    """Whether a browser says the request comes from this server's own pages (requests without these headers come
    from programs, not from pages, and pass)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc.lower() == (headers.get("host") or "").lower()


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server accepts ({limit} bytes)")


class Guard:
    """The checks of the module docstring, as a pure ASGI middleware (nothing is buffered)."""

    def __init__(self, app: ASGIApp, settings: Settings, store: Store) -> None:
        self.app, self.settings, self.store = app, settings, store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except ProblemError as error:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, self._limited(receive, self._body_limit(scope)), send)

    def _body_limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"] == UPLOADS_PATH:
            return self.settings.max_upload_bytes
        return self.settings.max_body_bytes

    def _check(self, scope: Scope) -> None:
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if path != "/healthz" and not host_allowed(self.settings, headers.get("host", "")):
            raise ProblemError(
                400, "Invalid Host header", "this server does not answer to that host name (KOALA_ALLOWED_HOSTS)"
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ProblemError(400, "Bad Request", "Content-Length must be a number of bytes")
            if int(length) > self._body_limit(scope):
                raise ProblemError(413, "Request body too large", BodyTooLargeError(self._body_limit(scope)).detail)
        method: str = scope["method"]
        if path.startswith("/v1/") and path not in PUBLIC_PATHS:
            cookies = _cookies(headers)
            who = identify(self.store, headers, cookies)  # before a byte of the body is read
            scope.setdefault("state", {})["caller"] = who
        else:
            who = None
        if method in UNSAFE_METHODS and not (who is not None and who.bearer) and not same_origin(headers):
            raise ProblemError(
                403,
                "Cross-site request refused",
                "a state-changing request authenticated by a cookie (or sent to an open server) must come from "
                "this server's own pages; programs authenticate with `Authorization: Bearer TOKEN`",
            )

    def _limited(self, receive: Receive, limit: int) -> Receive:
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        return limited


def _cookies(headers: Headers) -> dict[str, str]:
    return cookie_parser(headers.get("cookie", ""))

"""optuna-dashboard inside the service's app, under /optuna, behind the API's auth.

optuna-dashboard is a WSGI app (bottle) that expects to own the site's root: its page loads `/static/bundle.js` and
its scripts call `/api/...`. Under a prefix, the page and the bundle are served rewritten to point below the prefix
(the rewritten strings are template literals and property names, which minification keeps).

Once API tokens exist, each request needs the session cookie or a bearer token, and a token sees only the studies of
the jobs the API shows it (a route not known to be about one study, or about none, is refused). It is read-only here:
a job's driver is the single writer of its studies, so notes, renames, deletions and manual trial results are refused.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import urllib.parse
from typing import Any, cast

import optuna
import optuna_dashboard
from a2wsgi import WSGIMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Caller, caller
from service.problems import PROBLEM, ProblemError
from service.store import Store

log = logging.getLogger("service.dashboard")

STUDY_NAME = re.compile(r"^job-(?P<job>[^/]+)/")
# Requests about one study: its detail, plots, importances, CSV export, artifacts.
STUDY_PATH = re.compile(r"^/(?:api/studies|csv|artifacts)/(?P<study>\d+)(?:/|$)")
READ_METHODS = frozenset({"GET", "HEAD"})
SHARED_PATHS = frozenset({"/api/meta", "/favicon.ico"})  # nothing about any study


def patch_bundle(source: str, prefix: str) -> str:
    """optuna-dashboard's script with its absolute URLs moved under `prefix`."""
    rewrites = {
        "${this.baseURL}/api": "${this.baseURL}" + prefix + "/api",
        'url_prefix:"/dashboard"': f'url_prefix:"{prefix}/dashboard"',
        "`/csv/": f"`{prefix}/csv/",
        "`/artifacts/": f"`{prefix}/artifacts/",
    }
    for old, new in rewrites.items():
        if old not in source:
            log.warning("optuna-dashboard %s changed (no %r): its pages under %s may break", _version(), old, prefix)
        source = source.replace(old, new)
    return source


def _version() -> str:
    return str(getattr(optuna_dashboard, "__version__", "?"))


class OptunaDashboard:
    """An ASGI app serving optuna-dashboard for `storage`, with the checks described above."""

    def __init__(self, storage: optuna.storages.BaseStorage, store: Store) -> None:
        self.storage = storage
        self.store = store
        self.inner = cast(ASGIApp, WSGIMiddleware(optuna_dashboard.wsgi(storage)))
        self._bundles: dict[str, tuple[bytes, bytes]] = {}  # prefix -> (script, gzipped script)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        request = Request(scope, receive)
        prefix = scope.get("root_path", "")
        path = scope["path"].removeprefix(prefix)
        try:
            who = await caller(request)
        except ProblemError as error:
            if "text/html" in request.headers.get("accept", ""):
                back = urllib.parse.quote(scope["path"], safe="")
                await RedirectResponse(f"/ui/login?next={back}", status_code=303)(scope, receive, send)
            else:
                await _problem(error.status, error.title, error.detail, {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
            return
        response = await self._respond(scope, path, prefix, who)
        if response is None:
            await self.inner(scope, receive, send)
        else:
            await response(scope, receive, send)

    async def _respond(self, scope: Scope, path: str, prefix: str, who: Caller) -> Response | None:
        """Our answer to the request, or None to pass it to optuna-dashboard unchanged."""
        if scope["method"] not in READ_METHODS:
            detail = "optuna-dashboard is read-only here: a job's studies are written by its driver only"
            return _problem(405, "Method Not Allowed", detail, {"Allow": "GET, HEAD"})
        if path in ("", "/"):
            return RedirectResponse(f"{prefix}/dashboard", status_code=303)
        if path == "/static/bundle.js":
            return await self._bundle(scope, prefix)
        if path.startswith("/dashboard"):
            status, headers, body = await self._buffered(scope)
            icon = f'<head>\n    <link rel="icon" href="{prefix}/favicon.ico">'  # else browsers ask the site root
            page = body.replace(b'src="/static/', f'src="{prefix}/static/'.encode()).replace(
                b"<head>", icon.encode(), 1
            )
            return Response(page, status_code=status, headers=headers)
        if not who.restricted or path in SHARED_PATHS or path.startswith("/static/"):
            return None
        if match := STUDY_PATH.match(path):
            name = await run_in_threadpool(self._study_name, int(match["study"]))
            if name is not None and not await run_in_threadpool(self._may_see, who, name):
                return _problem(404, "Not Found", f"no study {match['study']}")
            return None
        if path == "/api/studies":
            status, headers, body = await self._buffered(scope)
            if status != 200:
                return Response(body, status_code=status, headers=headers)
            listing: dict[str, Any] = json.loads(body)
            summaries = listing.get("study_summaries", [])
            listing["study_summaries"] = await run_in_threadpool(self._visible, who, summaries)
            return JSONResponse(listing, headers={k: v for k, v in headers.items() if k.lower() != "content-type"})
        # Anything else could show studies we have not checked (a route a later optuna-dashboard adds, say).
        return _problem(404, "Not Found", f"{path} is not served to API tokens")

    def _study_name(self, study_id: int) -> str | None:
        try:
            return str(self.storage.get_study_name_from_id(study_id))
        except KeyError:
            return None  # optuna-dashboard answers its own 404

    def _visible(self, who: Caller, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in summaries if self._may_see(who, str(s.get("study_name", "")))]

    def _may_see(self, who: Caller, study_name: str) -> bool:
        """Whether the caller may see the job a study belongs to; studies of no job of this server stay hidden."""
        match = STUDY_NAME.match(study_name)
        job = self.store.get_job(match["job"]) if match else None
        return job is not None and who.may_see(job)

    async def _bundle(self, scope: Scope, prefix: str) -> Response:
        if prefix not in self._bundles:
            plain = dict(scope)
            kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
            plain["headers"] = [*kept, (b"accept-encoding", b"identity")]  # it insists on the header
            status, _, body = await self._buffered(plain)
            if status != 200:
                return _problem(502, "Bad Gateway", f"optuna-dashboard did not serve its script ({status})")
            script = patch_bundle(body.decode("utf-8"), prefix).encode("utf-8")
            self._bundles[prefix] = (script, await run_in_threadpool(gzip.compress, script, 6))
        script, compressed = self._bundles[prefix]
        headers = {"Cache-Control": "max-age=3600", "Vary": "Accept-Encoding"}
        if "gzip" in Request(scope).headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(compressed, media_type="text/javascript", headers=headers)
        return Response(script, media_type="text/javascript", headers=headers)

    async def _buffered(self, scope: Scope) -> tuple[int, dict[str, str], bytes]:
        """Run a bodiless request through optuna-dashboard and collect its whole response."""
        status, headers, chunks = 500, {}, []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {
                    k.decode("latin-1"): v.decode("latin-1")
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"content-length", b"content-encoding")
                }
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.inner(scope, receive, send)
        return status, headers, b"".join(chunks)


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)

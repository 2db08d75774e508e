"""The HTTP API (docs/architecture.md "HTTP API"): `create_app()` builds it, `serve()` runs it with uvicorn.

`create_app` builds the state the routes read (settings, store, Optuna storage, scheduler, uploads), the checks
every request passes first (`Guard`), the error handlers and the lifespan, then includes the routers of
service/api/ and the dashboard. Errors are `application/problem+json` with the offending field. Auth
(docs/architecture.md "Security"): bearer tokens created with `koala token create`; without any token the API is
open, which is only allowed on a loopback address.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from koala import workloads
from koala_client import models
from service.api import router as api_router
from service.auth import ExposureError, Guard, check_exposure
from service.dashboard import mount as mount_dashboard
from service.jobspec import SpecError
from service.problems import ProblemError, problem_response
from service.recorder import storage_for
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import Store
from service.uploads import Sweeper, Uploads

log = logging.getLogger("service")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API, with the scheduler unless `settings.run_scheduler` is off (extra API replicas)."""
    settings = settings or Settings()
    scheduler = settings.run_scheduler
    store = Store(settings.database_url, token_cache_seconds=settings.token_cache_seconds)
    if settings.migrate_on_start:
        store.migrate()
    storage = storage_for(settings.database_url)  # creates Optuna's tables on a new database
    runner = Scheduler(store, storage, settings)
    uploads = Uploads(store)
    sweeper = Sweeper(uploads, settings)  # deletes uploads past their retention period
    workloads.registry()  # the workloads a job may name: built-ins and entry points, loaded once, now

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if check_exposure(settings, store):
            log.warning(
                "no API tokens configured: the API is open to anyone on this machine (create one with "
                "`koala token create`)"
            )
        if scheduler:
            runner.start()
            sweeper.start()
        _freeze_start_up_objects()
        yield
        if scheduler:
            sweeper.stop()
            runner.stop()
        store.close()

    app = FastAPI(
        title="KOALA optimizer comparison service",
        version="1.0",
        summary="Compare the hyperparameter-free KOALA optimizer with fixed or Optuna-tuned baselines on Ray Tune.",
        lifespan=lifespan,
        responses={
            401: {"model": models.Problem, "description": "Missing or unknown API token"},
            422: {"model": models.Problem, "description": "Invalid request; `field` names the offending field"},
        },
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.scheduler = runner
    app.state.uploads = uploads
    app.add_middleware(Guard, settings=settings, store=store)
    _install_error_handlers(app)
    app.include_router(api_router)
    mount_dashboard(app)
    return app


def _freeze_start_up_objects() -> None:
    """Move every object alive once the app has started (the modules, the workload registry's torch, the app
    itself) out of the collector's generations. They live as long as the process, yet each full collection walked
    them all: with torch loaded that is about 400,000 objects and 0.2-0.5 s, a pause every few thousand requests that
    set the p99 of light reads. Afterwards a full collection walks only what requests left behind. Garbage from the
    start-up is collected first, so none of it is kept for good."""
    gc.collect()
    gc.freeze()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, error: ProblemError) -> JSONResponse:
        return error.response()

    @app.exception_handler(SpecError)
    async def on_spec_error(request: Request, error: SpecError) -> JSONResponse:
        return _validation_problem(error.errors)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = []
        for item in error.errors():
            where, *rest = [str(p) for p in item["loc"]] or ["body"]
            path = SpecError.from_loc(rest) if where == "body" else ".".join(rest) or where
            message = str(item["msg"]).removeprefix("Value error, ")
            errors.append({"field": path, "message": message, "in": where})
        return _validation_problem(errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not Found", 405: "Method Not Allowed", 413: "Request body too large"}.get(
            error.status_code, "HTTP error"
        )
        return problem_response(models.Problem(title=title, status=error.status_code, detail=str(error.detail)))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        detail = f"internal error ({type(error).__name__}); the server log has the details"
        return problem_response(models.Problem(title="Internal Server Error", status=500, detail=detail))


def _validation_problem(errors: list[dict[str, str]]) -> JSONResponse:
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    detail = "; ".join(f"{e['field'] or '(body)'}: {e['message']}" for e in errors)
    return problem_response(
        models.Problem(
            type="https://koala.dev/problems/validation",
            title="Invalid request",
            status=422,
            detail=detail,
            field=first["field"],
            errors=errors,
        )
    )


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the API and the scheduler with uvicorn until interrupted (`koala serve`).

    With several worker processes each runs a scheduler; they coordinate through the database like API replicas."""
    import uvicorn

    settings = Settings(host=host, port=port)
    try:
        app = create_app(settings)  # migrates the schema once, before any worker starts
        check_exposure(settings, app.state.store)
    except ExposureError as error:
        raise SystemExit(f"koala serve: {error}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"KOALA service on http://{shown}:{port}  (API docs: /docs, dashboard: /ui)", flush=True)
    # X-Forwarded-Proto/-For are believed only from the proxies the operator names (then a session cookie set over
    # TLS terminated by the proxy is marked Secure).
    proxies = {"proxy_headers": bool(settings.trusted_proxies), "forwarded_allow_ips": settings.trusted_proxies or None}
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning", **proxies)  # type: ignore[arg-type]
        return
    os.environ.update({"KOALA_HOST": host, "KOALA_PORT": str(port), "KOALA_MIGRATE_ON_START": "false"})
    app.state.store.close()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        **proxies,  # type: ignore[arg-type]
    )

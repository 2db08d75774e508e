"""The HTTP API (docs/architecture.md "HTTP API"): `create_app()` builds it, `serve()` runs it with uvicorn.

Jobs are validated, stored as `queued` and run by the scheduler (service/scheduler.py), one driver process per job.
Trials and results are read from the job's Optuna studies; events come from our events table. Errors are
`application/problem+json` with the offending field. Auth (docs/architecture.md "Security"): bearer tokens created with
`koala token create`; without any token the API is open, which is only allowed on a loopback address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

import optuna
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from optuna.trial import FrozenTrial
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from koala import optimizers, workloads
from koala_client import models
from service.auth import Auth, ExposureError, Guard, check_exposure, identify
from service.dashboard import mount as mount_dashboard
from service.jobspec import JobSpec, SpecError, type_name
from service.problems import ProblemError, problem_response
from service.ray_head import head_directory, read_state
from service.recorder import RUN_STARTED_AT, job_study_names, optimizer_names, storage_for
from service.report import build_report
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import BadCursorError, IdempotencyConflictError, JobRow, Store, body_hash
from service.uploads import Sweeper, Uploads, check_submission, job_upload
from service.uploads import router as uploads_router

log = logging.getLogger("service")
EVENT_POLL_SECONDS = 0.5
QUEUE_RETRY_SECONDS = 30  # Retry-After of a 429: about how long a queued job waits for a slot


def _not_found(job_id: str) -> ProblemError:
    return ProblemError(404, "Not Found", f"no job {job_id}", type="https://koala.dev/problems/not-found")


async def visible_job(request: Request, job_id: str, who: Auth) -> JobRow:
    """The job, if it exists and the caller may see it; another owner's job is indistinguishable from a missing one."""
    job = request.app.state.store.get_job(job_id)
    if job is None or not who.may_see(job):
        raise _not_found(job_id)
    return job  # type: ignore[no-any-return]


VisibleJob = Annotated[JobRow, Depends(visible_job)]


# ---- the app -------------------------------------------------------------------------------------------------------


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

    # ---- jobs ------------------------------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, response_model=models.Job, tags=["jobs"])
    async def submit_job(
        spec: JobSpec,
        request: Request,
        who: Auth,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> models.Job:
        """Submit a JobSpec (docs/architecture.md "JobSpec"). With `Idempotency-Key`, a repeat of the same request
        returns the same job; the same key with another body is rejected."""
        problems = spec.cross_check() + spec.check_limits(settings.limits)
        if problems:
            raise SpecError([{"field": field, "message": message} for field, message in problems])
        if spec.upload is not None:  # 403 without the permission, 404 for another owner's upload
            await run_in_threadpool(check_submission, uploads, settings, who, spec)
        queued = store.count_jobs(who.owner, ["queued"])
        if queued >= settings.max_queued_jobs_per_owner:
            raise ProblemError(
                429,
                "Too many queued jobs",
                f"{queued} of your jobs are queued, the most this server holds per token "
                f"({settings.max_queued_jobs_per_owner}); submit again when one has started",
                headers={"Retry-After": str(QUEUE_RETRY_SECONDS)},
            )
        body = await request.json()
        progress = {e.name: {"done": 0, "total": spec.trials_of(e)} for e in spec.optimizers}
        try:
            job, created = await run_in_threadpool(
                store.create_job,
                spec.model_dump(mode="json", exclude_defaults=False),
                name=spec.name,
                workload=spec.workload,
                progress=progress,
                owner=who.owner,
                idempotency_key=idempotency_key,
                request_hash=body_hash(body),
                upload=spec.upload,
            )
        except IdempotencyConflictError as error:
            raise ProblemError(422, "Idempotency-Key reused", str(error), field="Idempotency-Key") from None
        if created:
            runner.wake()
        return job.to_schema()

    @app.get("/v1/jobs", response_model=models.JobPage, tags=["jobs"])
    async def list_jobs(
        who: Auth,
        state: Annotated[list[models.JobState] | None, Query(description="Only jobs in these states")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> models.JobPage:
        """Jobs, newest first, a page at a time: pass `next_cursor` back as `cursor`."""
        try:
            rows, next_cursor = store.list_jobs(
                owner=who.owner,
                restrict_owner=who.restricted,
                include_ownerless=who.admin,
                states=state or (),
                limit=limit,
                cursor=cursor,
            )
        except BadCursorError as error:
            raise ProblemError(422, "Invalid cursor", str(error), field="cursor") from None
        return models.JobPage(jobs=[r.to_schema() for r in rows], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", response_model=models.Job, tags=["jobs"])
    async def get_job(job: VisibleJob) -> models.Job:
        """Spec, state, progress (trials done/total per optimizer), timestamps and error of a job, and the digest
        and file list of the workload pack it runs, if it was uploaded."""
        shown = job.to_schema()
        if job.upload is not None:
            shown.upload = await run_in_threadpool(job_upload, uploads, job)
        return shown

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=models.Job, tags=["jobs"])
    def cancel_job(job_id: str, visible: VisibleJob) -> models.Job:
        """Cancel a job (idempotent): a queued job ends at once; a running one moves to `cancelling`, its running
        trials stop within seconds and are closed as PRUNED, then it ends `cancelled`."""
        job = store.request_cancel(job_id)
        assert job is not None
        if job.state == "cancelling":
            runner.signal_cancel(job_id)
        return job.to_schema()

    @app.get("/v1/jobs/{job_id}/trials", response_model=list[models.Trial], tags=["results"])
    def list_trials(job_id: str, visible: VisibleJob) -> list[models.Trial]:
        """Every trial of the job, from its Optuna studies, in start order per optimizer."""
        return list(_trials(storage, job_id, optimizer_names(visible.spec)))

    @app.get("/v1/jobs/{job_id}/results", response_model=models.Report, tags=["results"])
    def job_results(job_id: str, job: VisibleJob) -> models.Report:
        """The comparison report, computed from the studies (so it reflects the job as it is now)."""
        try:
            return build_report(storage, job_id, optimizer_names(job.spec))
        except LookupError:
            detail = f"job {job_id} has no recorded trials yet (it is {job.state})"
            raise ProblemError(409, "No results yet", detail) from None

    @app.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse, tags=["jobs"])
    async def job_events(
        job_id: str,
        visible: VisibleJob,  # checked before the stream starts
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[int | None, Query(ge=0, description="Resume after this event id")] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events: `state` changes, `trial` starts and ends, and `epoch` progress. The stream ends once
        the job has ended and every event was sent; reconnect with `Last-Event-ID` to resume."""
        cursor = after if after is not None else _event_id(last_event_id)
        while True:
            batch = await run_in_threadpool(store.events_after, job_id, cursor)
            for event in batch:
                cursor = event.id
                yield ServerSentEvent(data=event.model_dump(mode="json"), event=event.kind, id=str(event.id))
            if batch:
                continue
            job = await run_in_threadpool(store.get_job, job_id)
            if job is None or job.state in models.TERMINAL_STATES:
                if not await run_in_threadpool(store.events_after, job_id, cursor):
                    return
                continue
            await asyncio.sleep(EVENT_POLL_SECONDS)

    # ---- catalogue and health --------------------------------------------------------------------------------------

    @app.get("/v1/workloads", response_model=list[models.WorkloadInfo], tags=["catalogue"])
    def list_workloads() -> list[models.WorkloadInfo]:
        """Workloads a JobSpec may name, with their metrics and configuration defaults."""
        return [_workload_info(name) for name in workloads.names()]

    @app.get("/v1/optimizers", response_model=list[models.OptimizerInfo], tags=["catalogue"])
    def list_optimizers() -> list[models.OptimizerInfo]:
        """Optimizers a JobSpec may name, with their hyperparameters and defaults."""
        return [_optimizer_info(name) for name in optimizers.names()]

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": models.Problem}})
    def readyz(request: Request) -> dict[str, str]:
        """Readiness: the database answers, and the Ray cluster in RAY_ADDRESS (if any) accepts connections. The
        details (what failed, the Ray address) are shown only to a caller with a token (or on an open server)."""
        try:
            identify(store, request.headers, request.cookies)
            detailed = True
        except ProblemError:
            detailed = False
        problem = None
        try:
            store.ping()
            ray = _ray_status(settings)
            if ray.startswith("unreachable"):
                problem = f"Ray cluster {ray}"
        except Exception as error:
            problem = f"database unavailable: {type(error).__name__}"
        if problem is not None:
            raise ProblemError(503, "Not ready", problem if detailed else "not ready")
        return {"status": "ready", "database": "ok", "ray": ray} if detailed else {"status": "ready"}

    app.include_router(uploads_router)
    mount_dashboard(app)
    return app


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


def _event_id(header: str | None) -> int:
    try:
        return max(0, int(header)) if header else 0
    except ValueError:
        raise ProblemError(422, "Invalid Last-Event-ID", "Last-Event-ID must be an event id", "Last-Event-ID") from None


# ---- readers -------------------------------------------------------------------------------------------------------


def _trials(storage: optuna.storages.BaseStorage, job_id: str, optimizers: list[str]) -> Iterator[models.Trial]:
    for name in job_study_names(storage, job_id, optimizers):
        study = optuna.load_study(study_name=name, storage=storage)
        optimizer = str(study.user_attrs.get("optimizer", name.split("/", 1)[-1]))
        for trial in study.get_trials(deepcopy=False):
            if "phase" in trial.user_attrs:  # a trial without one was never started (see Recorder.close_orphans)
                yield _trial(optimizer, trial)


def _trial(optimizer: str, trial: FrozenTrial) -> models.Trial:
    attrs = trial.user_attrs
    return models.Trial(
        optimizer=optimizer,
        number=trial.number,
        phase=attrs.get("phase", "eval"),
        seed=int(attrs.get("seed", 0)),
        params=dict(attrs.get("hyperparams", trial.params)),
        state=trial.state.name.lower(),  # type: ignore[arg-type]
        value=trial.value,
        metrics=dict(trial.intermediate_values),
        epochs_done=int(attrs.get("epochs_done", 0)),
        wall_seconds=float(attrs.get("wall_seconds", 0.0)),
        epoch_seconds=list(attrs.get("epoch_seconds", [])),
        device=attrs.get("device"),
        node=attrs.get("node"),
        reason=attrs.get("reason"),
        # When it began running on a Ray worker, else when it was created (it may wait for resources in between).
        # Optuna stores local wall-clock times without a zone.
        started_at=(
            datetime.fromisoformat(attrs[RUN_STARTED_AT])
            if RUN_STARTED_AT in attrs
            else trial.datetime_start.astimezone()
            if trial.datetime_start
            else None
        ),
        finished_at=trial.datetime_complete.astimezone() if trial.datetime_complete else None,
    )


def _workload_info(name: str) -> models.WorkloadInfo:
    cls = workloads.workload_class(name)
    config = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    try:
        schema = TypeAdapter(cls.Config).json_schema()
    except Exception:  # a user workload's config type pydantic cannot describe: defaults still say enough
        schema = {}
    return models.WorkloadInfo(
        name=name,
        description=cls.description,
        metric=cls.metric,
        mode=cls.mode,
        metrics=cls.metric_modes(),
        config=config,
        config_schema=schema,
    )


def _optimizer_info(name: str) -> models.OptimizerInfo:
    spec = optimizers.get(name)
    return models.OptimizerInfo(
        name=name,
        description=spec.description,
        hyperparameters=[
            models.HyperparameterInfo(name=key, default=value, type=type_name(name, key))
            for key, value in spec.hyperparameters().items()
        ],
    )


def _ray_status(settings: Settings) -> str:
    address = os.environ.get("RAY_ADDRESS")
    if not address and not settings.ray_head:
        return "local (a Ray instance is started per job)"
    if not address:
        head = read_state(head_directory(settings.data_dir))
        if head is not None and head.process_alive():
            return f"local head at {head.address} (the service's, shared by every job)"
        return "local head not running (the scheduler starts it; jobs wait until it runs)"
    if address == "auto":
        return "auto"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=2):
            return f"reachable at {address}"
    except (OSError, ValueError) as error:
        return f"unreachable at {address}: {error}"


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

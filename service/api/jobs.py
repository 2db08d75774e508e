"""Jobs (docs/architecture.md "HTTP API"): submit, list, get and cancel them, and read their trials, results and
event stream.

Jobs are validated, stored as `queued` and run by the scheduler (service/scheduler.py), one driver process per job.
Trials and results are read from the job's Optuna studies; events come from our events table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Annotated

import optuna
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from optuna.trial import FrozenTrial
from starlette.concurrency import run_in_threadpool

from koala_client import models
from service.api.deps import Auth, SchedulerDep, SettingsDep, StorageDep, StoreDep, UploadsDep, VisibleJob
from service.jobspec import JobSpec, SpecError
from service.problems import ProblemError
from service.recorder import RUN_STARTED_AT, job_study_names, optimizer_names
from service.report import build_report
from service.store import BadCursorError, IdempotencyConflictError, body_hash
from service.uploads import check_submission, job_upload

EVENT_POLL_SECONDS = 0.5
QUEUE_RETRY_SECONDS = 30  # Retry-After of a 429: about how long a queued job waits for a slot

router = APIRouter()


@router.post("/v1/jobs", status_code=202, response_model=models.Job, tags=["jobs"])
async def submit_job(
    spec: JobSpec,
    request: Request,
    who: Auth,
    settings: SettingsDep,
    store: StoreDep,
    uploads: UploadsDep,
    scheduler: SchedulerDep,
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
        scheduler.wake()
    return job.to_schema()


@router.get("/v1/jobs", response_model=models.JobPage, tags=["jobs"])
async def list_jobs(
    who: Auth,
    store: StoreDep,
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


@router.get("/v1/jobs/{job_id}", response_model=models.Job, tags=["jobs"])
async def get_job(job: VisibleJob, uploads: UploadsDep) -> models.Job:
    """Spec, state, progress (trials done/total per optimizer), timestamps and error of a job, and the digest
    and file list of the workload pack it runs, if it was uploaded."""
    shown = job.to_schema()
    if job.upload is not None:
        shown.upload = await run_in_threadpool(job_upload, uploads, job)
    return shown


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=models.Job, tags=["jobs"])
def cancel_job(job_id: str, visible: VisibleJob, store: StoreDep, scheduler: SchedulerDep) -> models.Job:
    """Cancel a job (idempotent): a queued job ends at once; a running one moves to `cancelling`, its running
    trials stop within seconds and are closed as PRUNED, then it ends `cancelled`."""
    job = store.request_cancel(job_id)
    assert job is not None
    if job.state == "cancelling":
        scheduler.signal_cancel(job_id)
    return job.to_schema()


@router.get("/v1/jobs/{job_id}/trials", response_model=list[models.Trial], tags=["results"])
def list_trials(job_id: str, visible: VisibleJob, storage: StorageDep) -> list[models.Trial]:
    """Every trial of the job, from its Optuna studies, in start order per optimizer."""
    return list(_trials(storage, job_id, optimizer_names(visible.spec)))


@router.get("/v1/jobs/{job_id}/results", response_model=models.Report, tags=["results"])
def job_results(job_id: str, job: VisibleJob, storage: StorageDep) -> models.Report:
    """The comparison report, computed from the studies (so it reflects the job as it is now)."""
    try:
        return build_report(storage, job_id, optimizer_names(job.spec))
    except LookupError:
        detail = f"job {job_id} has no recorded trials yet (it is {job.state})"
        raise ProblemError(409, "No results yet", detail) from None


async def event_cursor(
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, description="Resume after this event id")] = None,
) -> int:
    """The event after which a stream starts. A dependency, so a bad `Last-Event-ID` is a 422 before the stream
    starts rather than an error in the middle of it."""
    if after is not None:
        return after
    try:
        return max(0, int(last_event_id)) if last_event_id else 0
    except ValueError:
        raise ProblemError(422, "Invalid Last-Event-ID", "Last-Event-ID must be an event id", "Last-Event-ID") from None


@router.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse, tags=["jobs"])
async def job_events(
    job_id: str,
    visible: VisibleJob,  # checked before the stream starts
    store: StoreDep,
    cursor: Annotated[int, Depends(event_cursor)],
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: `state` changes, `trial` starts and ends, and `epoch` progress. The stream ends once
    the job has ended and every event was sent; reconnect with `Last-Event-ID` to resume."""
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


# ---- trials, read from the studies ---------------------------------------------------------------------------------


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

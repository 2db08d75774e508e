"""What the routes depend on, read from the application state `create_app` builds (so a test can replace any of it
with `app.dependency_overrides`): settings, store, Optuna storage, scheduler, uploads, the caller, and the job a
caller may see.

The dependencies are coroutines: FastAPI runs a plain function in a worker thread, which costs more than reading an
attribute."""

from __future__ import annotations

from typing import Annotated

import optuna
from fastapi import Depends, Request

from service.auth import Caller, caller
from service.problems import ProblemError
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import JobRow, Store
from service.uploads import Uploads

__all__ = [
    "Auth",
    "SchedulerDep",
    "SettingsDep",
    "StorageDep",
    "StoreDep",
    "UploadsDep",
    "VisibleJob",
    "job_not_found",
    "visible_job",
]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_storage(request: Request) -> optuna.storages.BaseStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


async def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler  # type: ignore[no-any-return]


async def get_uploads(request: Request) -> Uploads:
    return request.app.state.uploads  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[optuna.storages.BaseStorage, Depends(get_storage)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
UploadsDep = Annotated[Uploads, Depends(get_uploads)]
Auth = Annotated[Caller, Depends(caller)]


def job_not_found(job_id: str) -> ProblemError:
    return ProblemError(404, "Not Found", f"no job {job_id}", type="https://koala.dev/problems/not-found")


async def visible_job(job_id: str, store: StoreDep, who: Auth) -> JobRow:
    """The job, if it exists and the caller may see it; another owner's job is indistinguishable from a missing one."""
    job = store.get_job(job_id)
    if job is None or not who.may_see(job):
        raise job_not_found(job_id)
    return job


VisibleJob = Annotated[JobRow, Depends(visible_job)]

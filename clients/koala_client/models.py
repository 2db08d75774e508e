"""Request and response models of the HTTP API (docs/architecture.md "HTTP API"), shared by the service and the SDK.

They live in the client package so that the SDK installs alone (`koala-optim[client]`); the service imports them from
here. Only pydantic: importing this module pulls in neither torch, Ray nor Optuna.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "cancelling", "cancelled", "succeeded", "failed"]
TERMINAL_STATES: frozenset[str] = frozenset({"cancelled", "succeeded", "failed"})
JOB_STATES: tuple[str, ...] = ("queued", "running", "cancelling", "cancelled", "succeeded", "failed")


class UploadFile(BaseModel):
    """A file of an uploaded workload pack."""

    path: str  # relative, with "/" separators, starting with the workload directory's name
    size: int  # bytes, unpacked


class JobUpload(BaseModel):
    """The workload pack a job runs (its code, shipped to the Ray nodes with the job)."""

    digest: str  # "sha256:<hex>" of the pack's bytes
    size: int | None = None  # bytes of the pack; with files, shown by GET /v1/jobs/{id} while the upload is stored
    files: list[UploadFile] | None = None


class Upload(BaseModel):
    """A workload pack stored by POST /v1/uploads, as its owner sees it."""

    digest: str  # "sha256:<hex>" of the pack's bytes: what a JobSpec's `upload` names
    size: int  # bytes of the pack (a zip archive)
    unpacked_size: int
    file_count: int
    files: list[UploadFile] | None = None  # listed for one upload, not in lists
    requirements: list[str] = Field(default_factory=list)  # the requirement lines of its requirements.txt, if any
    created_at: datetime
    last_used_at: datetime
    jobs: int = 0  # jobs of its owner that ran or will run it


class UploadLimits(BaseModel):
    """What this server accepts in POST /v1/uploads, for this caller."""

    allowed: bool  # whether the caller may upload code at all
    detail: str | None = None  # why not, and how an operator allows it
    max_bytes: int
    max_files: int
    max_unpacked_bytes: int
    package_installs: bool  # whether a pack's requirements.txt is installed (else such a job is refused)


class OptimizerProgress(BaseModel):
    done: int  # trials finished (any final state)
    total: int  # trials planned


class Job(BaseModel):
    """A submitted comparison job."""

    id: str
    name: str
    workload: str
    optimizers: list[str]
    state: JobState
    spec: dict[str, Any]
    progress: dict[str, OptimizerProgress]
    trials_done: int
    trials_total: int
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0  # driver starts (more than one after a resume)
    upload: JobUpload | None = None  # the uploaded workload pack the job runs, if any


class JobPage(BaseModel):
    """One page of GET /v1/jobs, newest first; pass `next_cursor` as `cursor` for the next page."""

    jobs: list[Job]
    next_cursor: str | None = None


class Trial(BaseModel):
    """One Optuna trial of a job, as GET /v1/jobs/{id}/trials returns it."""

    optimizer: str
    number: int
    phase: Literal["tune", "eval"]
    seed: int
    params: dict[str, Any]  # the hyperparameters the trial trained with
    state: Literal["running", "complete", "pruned", "fail", "waiting"]
    value: float | None = None
    metrics: dict[int, float] = Field(default_factory=dict)  # epoch -> the job's metric
    epochs_done: int = 0
    wall_seconds: float = 0.0
    epoch_seconds: list[float] = Field(default_factory=list)
    device: str | None = None
    node: str | None = None  # Ray node id of the node that ran it
    reason: str | None = None  # why a trial was pruned or failed
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Event(BaseModel):
    """An entry of a job's event stream. kind: state (data: state, error), trial (optimizer, phase, seed, state) or
    epoch (optimizer, phase, seed, epoch, value)."""

    id: int
    job_id: str
    kind: Literal["state", "trial", "epoch"]
    at: datetime
    data: dict[str, Any]


class HyperparameterInfo(BaseModel):
    name: str
    default: Any = None
    type: str


class OptimizerInfo(BaseModel):
    name: str
    description: str
    hyperparameters: list[HyperparameterInfo]


class WorkloadInfo(BaseModel):
    name: str
    description: str
    metric: str
    mode: Literal["max", "min"]
    metrics: dict[str, Literal["max", "min"]]  # every metric it reports, with its direction
    config: dict[str, Any]  # configuration fields with their defaults
    config_schema: dict[str, Any]  # JSON schema of workload_config


class TokenCreated(BaseModel):
    id: str
    name: str
    token: str  # shown once; only its hash is stored
    admin: bool = False
    allow_uploads: bool = False  # may upload workload code (POST /v1/uploads)


class TokenInfo(BaseModel):
    """An API token as `koala token list` shows it (never the token itself)."""

    id: str
    name: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None
    allow_uploads: bool = False


class Problem(BaseModel):
    """application/problem+json (RFC 9457). `errors` lists every offending field of a validation error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = None
    errors: list[dict[str, str]] | None = None


class CurvePoint(BaseModel):
    epoch: int
    mean: float
    std: float
    n: int  # seeds that reported this epoch


class TargetReach(BaseModel):
    reached: int  # evaluation trials that reached the target
    of: int
    epochs_mean: float | None = None
    seconds_mean: float | None = None


class OptimizerReport(BaseModel):
    optimizer: str
    mode: Literal["fixed", "tuned"]
    hyperparams: dict[str, Any]
    trials: dict[str, int]  # state name -> count
    final_mean: float | None
    final_std: float | None
    final_min: float | None
    final_max: float | None
    seeds: int  # evaluation trials with a final value
    curve: list[CurvePoint]
    target: TargetReach | None
    compute_seconds: float
    tuning_seconds: float


class HpoCost(BaseModel):
    optimizer: str
    koala_optimizer: str
    koala_result: float
    matched: bool
    tuning_seconds_to_match: float | None  # None when no tuning trial matched
    tuning_trials_to_match: int | None
    koala_seconds_per_run: float
    ratio: float | None  # tuning_seconds_to_match / koala_seconds_per_run
    ratio_lower_bound: float | None  # when not matched: all tuning compute / koala_seconds_per_run


class FailedTrial(BaseModel):
    """A trial that ended FAIL, and why (diverged, time limit, the error it raised, ...)."""

    optimizer: str
    phase: Literal["tune", "eval"]
    seed: int
    number: int  # the trial's number in its optimizer's study
    reason: str


class Report(BaseModel):
    job_id: str
    metric: str
    direction: Literal["maximize", "minimize"]
    target: float | None
    optimizers: list[OptimizerReport]
    ranking: list[str]
    hpo_cost: list[HpoCost]
    failed_trials: list[FailedTrial] = Field(default_factory=list)

"""Recording trials in Optuna: one study per (job, optimizer), written only by the job's driver.

Study `job-{id}/{optimizer}` carries the job's context as study user attributes (mode, metric, direction, target,
epochs, the hyperparameters of fixed entries). Each trial carries its params, one intermediate value per epoch, its
final value and state (COMPLETE, PRUNED or FAIL with a reason) and the user attributes optimizer, seed, phase (`tune`
or `eval`), epochs_done, wall_seconds, epoch_seconds, device, node (the Ray node), diverged, reason, hyperparams,
run_started_at (when it began running on a Ray worker, holding its resources; a trial waits for them after it is
created, which is its Optuna `datetime_start`) and, for a trial re-run after its driver died, restarts.

A job's studies are found by name from its JobSpec's optimizers (`job_study_names(storage, job_id, optimizers)`), so
reading a job costs the same however many jobs the database holds.

A Recorder reads and writes through `GuardedStorage` (service/guarded_storage.py): each call is retried through a busy
database, and for a service driver each write is preceded by its fence check (is the job still this driver's?).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from service.guarded_storage import GuardedStorage
from service.jobspec import JobSpec, OptimizerEntry
from service.retry import DEFAULT_BUDGET_SECONDS
from service.search_space import distributions

Phase = Literal["tune", "eval"]
RUN_STARTED_AT = "run_started_at"  # trial user attribute: ISO time it began running on a Ray worker
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name(job_id: str, optimizer: str) -> str:
    return f"job-{job_id}/{optimizer}"


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for a SQLAlchemy URL (SQLite file or PostgreSQL); Optuna creates its tables."""
    return optuna.storages.RDBStorage(url, heartbeat_interval=None, engine_kwargs=_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite: wait for the writer lock instead of failing when the API reads while the driver writes.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}


@dataclass
class OpenTrial:
    """A trial the recorder has started (RUNNING in its study)."""

    optimizer: str
    study: optuna.Study
    trial: optuna.Trial
    phase: Phase
    seed: int
    hyperparams: dict[str, Any]
    node: str | None = None  # the Ray node it last reported from
    running: bool = False  # whether this driver saw it start running on a Ray worker


class Recorder:
    """The one writer of a job's studies."""

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        job_id: str,
        spec: JobSpec,
        sampler_seed: int = 0,
        *,
        fence: Callable[[], None] | None = None,
        retry_seconds: float = DEFAULT_BUDGET_SECONDS,
    ) -> None:
        # Every read and write goes through the guard: retried through a busy database, and (for a service driver)
        # each write checked against the job's generation first, so a replaced driver never writes a trial.
        if not isinstance(storage, GuardedStorage):
            storage = GuardedStorage(optuna.storages.get_storage(storage), fence, retry_seconds)
        self.storage: optuna.storages.BaseStorage = storage
        self.job_id = job_id
        self.spec = spec
        self._studies: dict[str, optuna.Study] = {}
        for index, entry in enumerate(spec.optimizers):
            # TPE, seeded per optimizer: a rerun of the same job proposes the same configurations.
            sampler = optuna.samplers.TPESampler(seed=sampler_seed + index)
            study = optuna.create_study(
                storage=storage,
                study_name=study_name(job_id, entry.name),
                direction=spec.direction,
                sampler=sampler,
                load_if_exists=True,
            )
            for key, value in self._study_attrs(entry).items():
                study.set_user_attr(key, value)
            self._studies[entry.name] = study

    def _study_attrs(self, entry: OptimizerEntry) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "optimizer": entry.name,
            "mode": "tuned" if entry.tuned else "fixed",
            "params": dict(entry.params),
            "metric": self.spec.metric_name,
            "direction": self.spec.direction,
            "target": self.spec.target,
            "epochs": self.spec.epochs,
            "seeds": self.spec.seed_list,
            "workload": self.spec.workload,
        }

    def study(self, optimizer: str) -> optuna.Study:
        return self._studies[optimizer]

    def open(
        self,
        entry: OptimizerEntry,
        phase: Phase,
        seed: int,
        fixed: Mapping[str, Any] | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> OpenTrial:
        """Start a trial: a TPE proposal over the entry's search space (phase tune) or the given fixed params."""
        study = self._studies[entry.name]
        if phase == "tune":
            assert entry.search is not None
            trial = study.ask(distributions(entry.search))
            chosen = dict(trial.params)
        else:
            chosen = dict(fixed or {})
            # Searched names keep their search distribution (a study's parameter has one kind); others are constants.
            searched = distributions(entry.search or {})
            fixed_distributions = {k: searched.get(k) or CategoricalDistribution([v]) for k, v in chosen.items()}
            study.enqueue_trial(chosen, skip_if_exists=False)
            trial = study.ask(fixed_distributions)
        hyperparams = {**entry.params, **chosen}
        attrs = {
            "optimizer": entry.name,
            "seed": seed,
            "hyperparams": hyperparams,
            "epochs_done": 0,
            **(extra_attrs or {}),
            # Last: each attribute is its own write, and a trial counts as planned only once it has a phase (a driver
            # killed before that leaves an orphan, which `close_orphans` closes).
            "phase": phase,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return OpenTrial(entry.name, study, trial, phase, seed, hyperparams)

    def adopt(self, frozen: optuna.trial.FrozenTrial) -> OpenTrial:
        """Take over a trial a dead driver left RUNNING: it is re-run under the same trial (so each planned trial
        appears exactly once in its study); its intermediate values are overwritten epoch by epoch."""
        optimizer = frozen.user_attrs.get("optimizer") or self._optimizer_of(frozen)
        study = self._studies[optimizer]
        trial = optuna.Trial(study, frozen._trial_id)
        trial.set_user_attr("restarts", int(frozen.user_attrs.get("restarts", 0)) + 1)
        attrs = frozen.user_attrs
        return OpenTrial(optimizer, study, trial, attrs["phase"], int(attrs["seed"]), dict(attrs["hyperparams"]))

    def _optimizer_of(self, frozen: optuna.trial.FrozenTrial) -> str:
        for name, study in self._studies.items():
            if any(t._trial_id == frozen._trial_id for t in study.get_trials(deepcopy=False)):
                return name
        raise LookupError(f"trial {frozen._trial_id} belongs to no study of job {self.job_id}")

    @staticmethod
    def mark_running(open_trial: OpenTrial) -> None:
        """The trial started running on a Ray worker (it holds its resources from now): `run_started_at`, once per
        driver (a retry on another worker keeps the first)."""
        if not open_trial.running:
            open_trial.running = True
            open_trial.trial.set_user_attr(RUN_STARTED_AT, datetime.now(UTC).isoformat())

    @staticmethod
    def report(open_trial: OpenTrial, epoch: int, value: float) -> None:
        """The metric after `epoch` as the trial's intermediate value at step `epoch`."""
        if math.isfinite(value):
            open_trial.trial.report(value, epoch)

    @staticmethod
    def close(
        open_trial: OpenTrial,
        state: TrialState,
        *,
        value: float | None = None,
        reason: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """End the trial as COMPLETE (with `value`), PRUNED or FAIL, with a reason for the last two."""
        trial = open_trial.trial
        for key, attr in {**(attrs or {}), "reason": reason}.items():
            trial.set_user_attr(key, attr)
        if state == TrialState.COMPLETE and value is not None and math.isfinite(value):
            open_trial.study.tell(trial, value)
        elif state == TrialState.PRUNED:
            open_trial.study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("reason", reason or "no finite metric")
            open_trial.study.tell(trial, state=TrialState.FAIL)

    def close_orphans(self) -> int:
        """Close the trials a dead driver left before giving them a phase: RUNNING (asked, never started) or WAITING
        (enqueued, never asked; Optuna would hand it, with the dead driver's parameters, to the next ask of its
        study). They are no planned trial, so a resumed job plans their slots afresh. Returns how many."""
        closed = 0
        for study in self._studies.values():
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                if "phase" not in trial.user_attrs:
                    self.storage.set_trial_user_attr(trial._trial_id, "reason", "interrupted before it started")
                    self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                    closed += 1
        return closed

    def close_dangling(self, reason: str, state: TrialState = TrialState.FAIL) -> int:
        """Close every trial still RUNNING in this job's studies (after a crash or a stop); returns how many."""
        return close_running(self.storage, self.job_id, reason, state, [e.name for e in self.spec.optimizers])


def close_running(
    storage: optuna.storages.BaseStorage,
    job_id: str,
    reason: str,
    state: TrialState,
    optimizers: Iterable[str] | None = None,
) -> int:
    """Close the RUNNING (and WAITING: enqueued, never asked) trials of every study of `job_id` (of those
    `optimizers`, see job_study_names) with `state` and `reason`."""
    closed = 0
    for name in job_study_names(storage, job_id, optimizers):
        study_id = storage.get_study_id_from_name(name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            storage.set_trial_state_values(trial._trial_id, state)
            closed += 1
    return closed


def job_study_names(
    storage: optuna.storages.BaseStorage, job_id: str, optimizers: Iterable[str] | None = None
) -> list[str]:
    """The names of the job's studies, sorted. With the JobSpec's `optimizers`, each is looked up by name (a study
    that does not exist yet is one whose optimizer has not started), at a cost that does not grow with the number of
    studies in the database; without them every study is listed (for callers that do not know the spec)."""
    if optimizers is None:
        prefix = f"job-{job_id}/"
        return sorted(s.study_name for s in storage.get_all_studies() if s.study_name.startswith(prefix))
    found = []
    for name in sorted({study_name(job_id, optimizer) for optimizer in optimizers}):
        try:
            storage.get_study_id_from_name(name)
        except KeyError:
            continue
        found.append(name)
    return found


def optimizer_names(spec: Mapping[str, Any]) -> list[str]:
    """The optimizers a stored JobSpec (as JSON) names, read without validating it (it may no longer parse)."""
    entries = spec.get("optimizers")
    if not isinstance(entries, list):
        return []
    return [str(e["name"]) for e in entries if isinstance(e, Mapping) and isinstance(e.get("name"), str)]


def finished_trials(study: optuna.Study, phase: Phase | None = None) -> Sequence[optuna.trial.FrozenTrial]:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if phase is None or t.user_attrs.get("phase") == phase]

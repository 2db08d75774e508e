"""Recording trials in Optuna: one study per (job, optimizer), written only by the job's driver.

Study `job-{id}/{optimizer}` carries the job's context as study user attributes (mode, metric, direction, target,
epochs, the hyperparameters of fixed entries). Each trial carries its params, one intermediate value per epoch, its
final value and state (COMPLETE, PRUNED or FAIL with a reason) and the user attributes optimizer, seed, phase (`tune`
or `eval`), epochs_done, wall_seconds, epoch_seconds, device, node (the Ray node), diverged, reason, hyperparams,
run_started_at (when it began running on a Ray worker, holding its resources; a trial waits for them after it is
created, which is its Optuna `datetime_start`) and, for a trial re-run after its driver died, restarts.

A job's studies are found by name from its JobSpec's optimizers (`job_study_names(storage, job_id, optimizers)`), so
reading a job costs the same however many jobs the database holds.

A Recorder reads and writes through `GuardedStorage`: each call is retried through a busy database, and for a service
driver each write is preceded by its fence check (is the job still this driver's?).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import optuna
from optuna._typing import JSONSerializable
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from service.jobspec import Choice, FloatRange, JobSpec, OptimizerEntry
from service.retry import DEFAULT_BUDGET_SECONDS, retry

Phase = Literal["tune", "eval"]
RUN_STARTED_AT = "run_started_at"  # trial user attribute: ISO time it began running on a Ray worker
T = TypeVar("T")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name(job_id: str, optimizer: str) -> str:
    return f"job-{job_id}/{optimizer}"


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for a SQLAlchemy URL (SQLite file or PostgreSQL); Optuna creates its tables."""
    return optuna.storages.RDBStorage(url, heartbeat_interval=None, engine_kwargs=_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite: wait for the writer lock instead of failing when the API reads while the driver writes.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}


class GuardedStorage(optuna.storages.BaseStorage):
    """The Optuna storage a Recorder writes through: every call is retried through a busy database (a locked SQLite
    file, a restarting PostgreSQL) for at most `retry_seconds`, and every write is preceded by `fence()`, the
    driver's check that the job is still its own (it raises, or ends the driver, once another driver took over)."""

    def __init__(
        self,
        inner: optuna.storages.BaseStorage,
        fence: Callable[[], None] | None = None,
        retry_seconds: float = DEFAULT_BUDGET_SECONDS,
    ) -> None:
        self.inner = inner
        self.fence = fence
        self.retry_seconds = retry_seconds

    def __getattr__(self, name: str) -> Any:  # anything beyond BaseStorage (e.g. an RDBStorage's engine)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _read(self, what: str, call: Callable[[], T]) -> T:
        return retry(call, what=f"reading {what}", budget=self.retry_seconds)

    def _write(self, what: str, call: Callable[[], T]) -> T:
        def attempt() -> T:
            if self.fence is not None:
                self.fence()
            return call()

        return retry(attempt, what=f"recording {what}", budget=self.retry_seconds)

    # ---- writes --------------------------------------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._write("a study", lambda: self.inner.create_new_study(directions, study_name))

    def delete_study(self, study_id: int) -> None:
        self._write("a study deletion", lambda: self.inner.delete_study(study_id))

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("a study attribute", lambda: self.inner.set_study_user_attr(study_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: JSONSerializable) -> None:
        self._write("a study attribute", lambda: self.inner.set_study_system_attr(study_id, key, value))

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._write("a new trial", lambda: self.inner.create_new_trial(study_id, template_trial))

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._write(
            "a trial parameter",
            lambda: self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution),
        )

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        attempts = 0

        def call() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return self.inner.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry after a commit whose acknowledgement was lost: the trial already has this state.
                if attempts > 1 and self.inner.get_trial(trial_id).state == state:
                    return True
                raise

        return self._write("a trial state", call)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write(
            "an epoch's metric", lambda: self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(f"trial attribute {key}", lambda: self.inner.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        self._write(f"trial attribute {key}", lambda: self.inner.set_trial_system_attr(trial_id, key, value))

    # ---- reads ---------------------------------------------------------------------------------------------------

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._read("a study", lambda: self.inner.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._read("a study", lambda: self.inner.get_study_name_from_id(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._read("a study", lambda: self.inner.get_study_directions(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("a study", lambda: self.inner.get_study_user_attrs(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("a study", lambda: self.inner.get_study_system_attrs(study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._read("the studies", self.inner.get_all_studies)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._read("a trial", lambda: self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number))

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._read("a trial", lambda: self.inner.get_trial_number_from_id(trial_id))

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._read("a trial", lambda: self.inner.get_trial_param(trial_id, param_name))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._read("a trial", lambda: self.inner.get_trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._read("the trials", lambda: self.inner.get_all_trials(study_id, deepcopy, states))

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._read("the trials", lambda: self.inner.get_n_trials(study_id, state))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._read("the best trial", lambda: self.inner.get_best_trial(study_id))

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_params(trial_id))

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_user_attrs(trial_id))

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_system_attrs(trial_id))

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)


def distributions(search: Mapping[str, FloatRange | Choice]) -> dict[str, BaseDistribution]:
    """Optuna distributions for a JobSpec search space."""
    out: dict[str, BaseDistribution] = {}
    for name, dim in search.items():
        if isinstance(dim, Choice):
            out[name] = CategoricalDistribution(dim.choices)
        elif dim.int:
            out[name] = IntDistribution(int(dim.low), int(dim.high), log=dim.log)
        else:
            out[name] = FloatDistribution(dim.low, dim.high, log=dim.log)
    return out


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

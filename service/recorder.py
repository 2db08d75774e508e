"""Recording trials in Optuna: one study per (job, optimizer), written only by the job's driver.

Study `job-{id}/{optimizer}` carries the job's context as study user attributes (mode, metric, direction, target,
epochs, the hyperparameters of fixed entries). Each trial carries its params, one intermediate value per epoch, its
final value and state (COMPLETE, PRUNED or FAIL with a reason) and the user attributes optimizer, seed, phase (`tune`
or `eval`), epochs_done, wall_seconds, epoch_seconds, device, node (the Ray node), diverged, reason, hyperparams and,
for a trial re-run after its driver died, restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from service.jobspec import Choice, FloatRange, JobSpec, OptimizerEntry

Phase = Literal["tune", "eval"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_name(job_id: str, optimizer: str) -> str:
    return f"job-{job_id}/{optimizer}"


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for a SQLAlchemy URL (SQLite file or PostgreSQL); Optuna creates its tables."""
    return optuna.storages.RDBStorage(url, heartbeat_interval=None, engine_kwargs=_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite: wait for the writer lock instead of failing when the API reads while the driver writes.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}


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


class Recorder:
    """The one writer of a job's studies."""

    def __init__(self, storage: optuna.storages.BaseStorage, job_id: str, spec: JobSpec, sampler_seed: int = 0) -> None:
        self.storage = storage
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
        """Close the RUNNING trials a dead driver left before giving them a phase (asked, never started); they are
        no planned trial, so a resumed job plans their slots afresh. Returns how many."""
        closed = 0
        for study in self._studies.values():
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "phase" not in trial.user_attrs:
                    self.storage.set_trial_user_attr(trial._trial_id, "reason", "interrupted before it started")
                    self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                    closed += 1
        return closed

    def close_dangling(self, reason: str, state: TrialState = TrialState.FAIL) -> int:
        """Close every trial still RUNNING in this job's studies (after a crash or a stop); returns how many."""
        return close_running(self.storage, self.job_id, reason, state)


def close_running(storage: optuna.storages.BaseStorage, job_id: str, reason: str, state: TrialState) -> int:
    """Close the RUNNING trials of every study of `job_id` with `state` and `reason`."""
    closed = 0
    for name in job_study_names(storage, job_id):
        study_id = storage.get_study_id_from_name(name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            storage.set_trial_state_values(trial._trial_id, state)
            closed += 1
    return closed


def job_study_names(storage: optuna.storages.BaseStorage, job_id: str) -> list[str]:
    prefix = f"job-{job_id}/"
    return sorted(s.study_name for s in storage.get_all_studies() if s.study_name.startswith(prefix))


def finished_trials(study: optuna.Study, phase: Phase | None = None) -> Sequence[optuna.trial.FrozenTrial]:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if phase is None or t.user_attrs.get("phase") == phase]

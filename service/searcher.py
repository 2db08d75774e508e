"""The job's plan, handed out to Ray Tune trial by trial, and recorded in Optuna as the trials run.

A fixed optimizer runs once per seed (phase `eval`). A tuned optimizer first runs `trials` TPE proposals on the
first seed (phase `tune`, optionally early-stopped by ASHA), then its best configuration once per seed (phase
`eval`). `JobSearcher`, in the driver process, hands out the planned trials as Tune asks for them (eval trials once
their optimizer's tuning has finished) and records every start, epoch and end in Optuna, so the driver is the only
writer. A resumed job plans only what its studies do not hold yet.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from service.jobspec import JobSpec, OptimizerEntry
from service.recorder import OpenTrial, Phase, Recorder, finished_trials
from service.trial import OBJECTIVE, TrialConfig

TRIAL_TIME_LIMIT = "time limit"  # the reason of a trial stopped for running past the trial time limit
JOB_TIME_LIMIT = "job time limit"  # the reason of a trial the job's time limit interrupted


@dataclass(frozen=True)
class TrialEvent:
    """Progress of a job, for live displays: kind is started, epoch or finished."""

    kind: str
    optimizer: str
    phase: Phase
    seed: int
    epoch: int = 0
    value: float | None = None
    state: str | None = None


EventSink = Callable[[TrialEvent], None]


@dataclass
class _Planned:
    entry: OptimizerEntry
    phase: Phase
    seed: int
    fixed: dict[str, Any] = field(default_factory=dict)
    adopt: optuna.trial.FrozenTrial | None = None  # a trial a dead driver left RUNNING, re-run in place


class JobSearcher(Searcher):
    """Hands out the job's planned trials and records them in Optuna (runs in the driver)."""

    def __init__(
        self,
        spec: JobSpec,
        recorder: Recorder,
        stop: threading.Event,
        on_event: EventSink | None = None,
        *,
        timed_out: threading.Event | None = None,
    ) -> None:
        super().__init__(metric=OBJECTIVE, mode="max" if spec.direction == "maximize" else "min")
        self.spec = spec
        self.stop = stop  # cancelled (the service's cancel, Ctrl-C)
        self.timed_out = timed_out or threading.Event()  # the job ran out of time
        # Tune trial ids stopped for running past the trial time limit -> the seconds they ran
        self.time_limited: dict[str, float] = {}
        self.recorder = recorder
        self.on_event = on_event or (lambda event: None)
        self.ready: deque[_Planned] = deque()
        self.tuning_left: dict[str, int] = {}
        recorder.close_orphans()
        for entry in spec.optimizers:
            self._plan(entry)
        self.running: dict[str, OpenTrial] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its configuration to disk for restores; this searcher's live state (database, lock, callbacks)
        # stays in the driver, and a job resumes from its Optuna studies instead.
        unpicklable = {"recorder", "lock", "on_event", "running", "stop", "timed_out"}
        return {k: v for k, v in self.__dict__.items() if k not in unpicklable}

    # ---- Searcher interface ----------------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, TrialConfig] | str | None:  # type: ignore[override]  # FINISHED: str
        with self.lock:
            if self.stop.is_set() or self.timed_out.is_set():
                return Searcher.FINISHED
            if not self.ready:
                return Searcher.FINISHED if not self.tuning_left else None  # eval trials wait for their tuning
            planned = self.ready.popleft()
            if planned.adopt is not None:
                opened = self.recorder.adopt(planned.adopt)
            else:
                opened = self.recorder.open(planned.entry, planned.phase, planned.seed, planned.fixed)
            self.running[trial_id] = opened
        self.on_event(TrialEvent("started", planned.entry.name, planned.phase, planned.seed))
        return TrialConfig(
            optimizer=planned.entry.name,
            hyperparams=opened.hyperparams,
            phase=planned.phase,
            seed=planned.seed,
            workload=self.spec.workload,
            workload_config=dict(self.spec.workload_config),
            epochs=self.spec.epochs,
            metric=self.spec.metric_name,
            cpu=self.spec.resources.cpu,
            gpu=self.spec.resources.gpu,
        ).as_tune_config()

    def on_trial_running(self, trial_id: str) -> None:
        """Tune started the trial on a Ray worker (it holds its resources from now): its `run_started_at`."""
        opened = self.running.get(trial_id)
        if opened is not None:
            Recorder.mark_running(opened)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        opened = self.running.get(trial_id)
        if opened is None or "epoch" not in result or result.get("diverged"):
            return
        value = float(result[OBJECTIVE])
        Recorder.report(opened, int(result["epoch"]), value)
        opened.trial.set_user_attr("epochs_done", int(result["epoch"]))
        if result.get("node") and result["node"] != opened.node:  # where it runs now (a retry may move it)
            opened.node = result["node"]
            opened.trial.set_user_attr("node", opened.node)
        self.on_event(TrialEvent("epoch", opened.optimizer, opened.phase, opened.seed, int(result["epoch"]), value))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        with self.lock:
            opened = self.running.pop(trial_id, None)
            if opened is None:
                return
            state, value, reason = self._outcome(trial_id, result, error)
            attrs = {
                "epochs_done": int((result or {}).get("epoch", 0)),
                # A trial stopped at its time limit before it reported anything still spent that time.
                "wall_seconds": float((result or {}).get("wall_seconds", self.time_limited.get(trial_id, 0.0))),
                "epoch_seconds": list((result or {}).get("epoch_seconds", [])),
                "device": (result or {}).get("device", "unknown"),
                "node": (result or {}).get("node"),
                "diverged": bool((result or {}).get("diverged", False)),
            }
            Recorder.close(opened, state, value=value, reason=reason, attrs=attrs)
            optimizer = opened.optimizer
            if opened.phase == "tune":
                self.tuning_left[optimizer] -= 1
                if self.tuning_left[optimizer] == 0:
                    del self.tuning_left[optimizer]
                    self._plan_evaluation(optimizer)
        self.on_event(TrialEvent("finished", optimizer, opened.phase, opened.seed, state=state.name))

    # ---- internals -------------------------------------------------------------------------------------------------

    def _outcome(
        self, trial_id: str, result: Mapping[str, Any] | None, error: bool
    ) -> tuple[TrialState, float | None, str | None]:
        if trial_id in self.time_limited:
            return TrialState.FAIL, None, TRIAL_TIME_LIMIT
        if error:
            return TrialState.FAIL, None, str((result or {}).get("error", "the trial raised an error"))
        interrupted_by_time = self.timed_out.is_set() and not self.stop.is_set()
        if not result:
            if interrupted_by_time:
                return TrialState.FAIL, None, JOB_TIME_LIMIT
            return TrialState.PRUNED, None, "stopped before its first epoch"
        if result.get("diverged"):
            return TrialState.FAIL, None, "diverged"
        if int(result.get("epoch", 0)) < self.spec.epochs:
            if interrupted_by_time:
                return TrialState.FAIL, None, JOB_TIME_LIMIT
            return TrialState.PRUNED, None, "cancelled" if self.stop.is_set() else "early-stopped"
        value = float(result[OBJECTIVE])
        if not math.isfinite(value):
            return TrialState.FAIL, None, "non-finite metric"
        return TrialState.COMPLETE, value, None

    def _plan(self, entry: OptimizerEntry) -> None:
        """Queue what is left of `entry`'s plan. A fresh job has no trials yet; a resumed one skips finished trials
        and re-runs, in place, the ones its dead driver left RUNNING."""
        if not entry.tuned:
            self._plan_seeds(entry, dict(entry.params))
            return
        assert entry.trials is not None
        trials = self.recorder.study(entry.name).get_trials(deepcopy=False)
        tuning = [t for t in trials if t.user_attrs.get("phase") == "tune"]
        finished = sum(t.state.is_finished() for t in tuning)
        left = entry.trials - finished
        if left <= 0:
            self._plan_evaluation(entry.name)
            return
        self.tuning_left[entry.name] = left
        adopted = [t for t in tuning if t.state == TrialState.RUNNING][:left]
        seed = self.spec.seed_list[0]
        self.ready.extend(_Planned(entry, "tune", seed, adopt=t) for t in adopted)
        self.ready.extend(_Planned(entry, "tune", seed) for _ in range(left - len(adopted)))

    def _plan_seeds(self, entry: OptimizerEntry, params: dict[str, Any]) -> None:
        """Queue `params` on every seed that has no evaluation trial of `entry` yet (or only a RUNNING one)."""
        trials = self.recorder.study(entry.name).get_trials(deepcopy=False)
        evaluation = {int(t.user_attrs["seed"]): t for t in trials if t.user_attrs.get("phase") == "eval"}
        for seed in self.spec.seed_list:
            earlier = evaluation.get(seed)
            if earlier is None:
                self.ready.append(_Planned(entry, "eval", seed, dict(params)))
            elif earlier.state == TrialState.RUNNING:
                self.ready.append(_Planned(entry, "eval", seed, adopt=earlier))

    def _plan_evaluation(self, optimizer: str) -> None:
        """Queue the best tuning configuration of `optimizer` on every seed."""
        entry = next(e for e in self.spec.optimizers if e.name == optimizer)
        best = best_tuning_trial(self.recorder.study(optimizer))
        if best is None:
            # Nothing to evaluate: record the eval trials as failed so the plan is complete and the reason visible.
            done = {t.user_attrs.get("seed") for t in finished_trials(self.recorder.study(optimizer), "eval")}
            for seed in self.spec.seed_list:
                if seed not in done:
                    opened = self.recorder.open(entry, "eval", seed, {})
                    Recorder.close(opened, TrialState.FAIL, reason="no tuning trial completed")
            return
        self._plan_seeds(entry, dict(best.params))


def best_tuning_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed tuning trial with the best value (pruned trials never count as best)."""
    completed = [t for t in finished_trials(study, "tune") if t.state == TrialState.COMPLETE and t.value is not None]
    if not completed:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(completed, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
